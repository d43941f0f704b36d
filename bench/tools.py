"""The tools `make bench` puts side by side, each mounting (or unpacking) an image and reporting
where its tree is: jkmount (eager, --lazy in its variants, --passthrough), skopeo + umoci, podman
image mount, fuse-overlayfs, ratarmount, native disk; the workloads run on them; memory read from
smaps."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from common import JK, RUNS, Result, WORK, attempt, drop_caches, out, sh, timed, unmount
from images import REQUIRED


class MountTool:
    """A tool that serves the image at a mountpoint of its own. `cold` starts from nothing
    (`_fetch`, then `_mount`); `warm` mounts again from what `cold` left behind."""

    name = subdir = None

    def __init__(self, ref, key):
        self.ref, self.dir = ref, WORK / self.subdir / key
        self.mnt = self.dir / "mnt"

    def root(self):
        return self.mnt

    def cold(self, probe):
        return self.cold_then(lambda root: lambda: (root / probe).stat())

    def cold_then(self, workload_for):
        """From nothing to the end of `workload_for(root)` run once through a fresh mount."""
        unmount(self.mnt)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.mnt.mkdir(parents=True)
        return timed(lambda: (self._fetch(), self._mount(), workload_for(self.root())()))

    def warm(self, probe):
        unmount(self.mnt)
        return timed(lambda: (self._mount(), (self.mnt / probe).stat()))

    def _fetch(self):
        """What a cold start does before mounting; nothing for a tool that pulls as it mounts."""

    def _mount(self):
        raise NotImplementedError

    def stop(self):
        unmount(self.mnt)


class Jkmount(MountTool):
    name, subdir = "jkmount", "jk"

    def __init__(self, ref, key):
        super().__init__(ref, key)
        self.cache = self.dir / "cache"

    def _mount(self):
        sh(JK, "-q", "--cache-dir", self.cache, self.ref, self.mnt)

    def server_pid(self, mnt=None):
        mnt = (mnt or self.mnt).resolve()
        for record in (self.cache / "v1" / "mounts").glob("*.json"):
            data = json.loads(record.read_text())
            if Path(data["mountpoint"]) == mnt:
                return data["pid"]
        return None

    def warm_evicted(self, probe):
        """A warm mount whose tree file is not in the page cache (evicted with
        posix_fadvise(DONTNEED), as memory pressure would)."""
        unmount(self.mnt)
        for tree in (self.cache / "v1" / "trees").glob("*.bin"):
            fd = os.open(tree, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return timed(lambda: (self._mount(), (self.mnt / probe).stat()))

    def many(self, n, probe):
        """Mounts the image n times from this cache, one after another: (seconds to mount them
        all, total Pss of their servers in MiB, how many server processes). Unmounts them all
        after."""
        mnts = [self.dir / "many" / str(i) for i in range(n)]
        for m in mnts:
            unmount(m)
            m.mkdir(parents=True, exist_ok=True)
        try:
            took = timed(lambda: [sh(JK, "-q", "--cache-dir", self.cache, self.ref, m) for m in mnts])
            for m in mnts:
                (m / probe).stat()
            # One server may serve many of them: each process counted once.
            pids = {self.server_pid(m) for m in mnts}
            pss = sum(smaps(pid)["Pss"] for pid in pids)
            return took, pss, len(pids)
        finally:
            for m in mnts:
                unmount(m)


    def volumes(self, n, probe):
        """n CSI volumes of the image held by `jkmount keeper` (what the CSI plugin asks it
        for, over its socket): (seconds to mount them all, total Pss in MiB of the keeper and
        the volumes' servers, how many server processes). The plugin itself is one process
        whatever n is."""
        socket_path = self.dir / "keeper.sock"
        targets = [self.dir / "volumes" / str(i) / "mount" for i in range(n)]
        keeper = subprocess.Popen([JK, "-q", "--cache-dir", self.cache, "keeper", "--listen",
                                   f"unix://{socket_path}"])
        try:
            def listening():
                with socket.socket(socket.AF_UNIX) as s:
                    return s.connect_ex(str(socket_path)) == 0

            deadline = time.monotonic() + 20
            while not listening():
                if time.monotonic() > deadline:
                    raise RuntimeError("jkmount keeper did not listen")
                time.sleep(0.02)

            def ask(request):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(socket_path))
                    s.sendall((json.dumps(request) + "\n").encode())
                    reply = json.loads(s.makefile().readline())
                if reply != "done":
                    raise RuntimeError(f"keeper: {reply}")

            def mount_all():
                for i, t in enumerate(targets):
                    ask({"op": "mount", "volume": f"vol-{i}", "target": str(t),
                         "images": [self.ref], "subdir": None, "platform": None,
                         "writable": False})
            took = timed(mount_all)
            for t in targets:
                (t / probe).stat()
            # One server may serve many volumes: each process counted once.
            pids = {self.server_pid(t) for t in targets}
            pss = smaps(keeper.pid)["Pss"] + sum(smaps(pid)["Pss"] for pid in pids)
            for t in targets:
                ask({"op": "unmount", "target": str(t)})
            return took, pss, len(pids)
        finally:
            for t in targets:
                unmount(t)
            keeper.kill()
            keeper.wait()


class Lazy(Jkmount):
    """jkmount --lazy: mounted once the image's indexes are fetched (made by `jkmount index
    --push` beforehand), layers fetched by range as read and completed in the background."""

    name = "jkmount --lazy"

    def _mount(self):
        sh(JK, "-q", "--cache-dir", self.cache, "--lazy", self.ref, self.mnt)


class LazyOnRead(Jkmount):
    """jkmount --lazy --no-background-fetch: only what is read crosses the link."""

    name = "jkmount --lazy --no-background-fetch"

    def _mount(self):
        sh(JK, "-q", "--cache-dir", self.cache, "--lazy", "--no-background-fetch", self.ref, self.mnt)


class EagerEstargz(Jkmount):
    """An eager jkmount mount of the large image packed as eStargz."""

    name = "jkmount (eStargz layers)"


class LazyEstargz(Lazy):
    """jkmount --lazy of the large image packed as eStargz: a read fetches its files' own
    gzip members."""

    name = "jkmount --lazy (eStargz layers)"


class LazyOnReadEstargz(LazyOnRead):
    """jkmount --lazy --no-background-fetch of the eStargz image."""

    name = "jkmount --lazy --no-background-fetch (eStargz layers)"


class LazyPrefetch(Lazy):
    """jkmount --lazy of the large image packed as eStargz with the files the require workload
    reads listed first (`pack --prefetch-from`), fetched at once at mount."""

    name = "jkmount --lazy (eStargz layers, prefetch list)"


class LazyTable(Lazy):
    """jkmount --lazy of the eStargz image pushed with no jkmount index: each layer served
    from its own table of contents."""

    name = "jkmount --lazy (eStargz layers, own table, no index)"


class EagerChunked(Jkmount):
    """An eager jkmount mount of the large image recompressed as zstd:chunked by skopeo."""

    name = "jkmount (zstd:chunked layers)"


class LazyChunked(Lazy):
    """jkmount --lazy of the zstd:chunked image: each layer served from its own table."""

    name = "jkmount --lazy (zstd:chunked layers, own table)"


class LazyCompleted(Lazy):
    """jkmount --lazy from an empty cache, read only once its background pass has completed
    every layer and `jkmount status` says each is checked and in the cache: each run mounts
    afresh, as an eager mount's "first after mount" does."""

    name = "jkmount --lazy, once complete"

    def warm(self, probe):
        unmount(self.mnt)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self._mount()
        wait_complete(self.cache, self.mnt)
        (self.mnt / probe).stat()


class LazyTableCompleted(LazyCompleted):
    """LazyCompleted of the eStargz image that has no jkmount index: served from its tables."""

    name = "jkmount --lazy (eStargz layers, own table), once complete"


class EagerTable(Jkmount):
    """An eager jkmount mount of the eStargz image that has no jkmount index."""

    name = "jkmount (eStargz layers)"


def zstd_chunked_copy(ref, dest):
    """`skopeo copy` of image `ref` to `dest`, its layers recompressed as zstd:chunked."""
    sh("skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
       "--dest-compress-format", "zstd:chunked", f"docker://{ref}", f"docker://{dest}")
    return dest


def layer_bytes_of(ref):
    """The summed sizes of image `ref`'s layers, from its manifest."""
    raw = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}",
             capture_output=True).stdout
    return sum(layer["size"] for layer in json.loads(raw)["layers"])


def index_for_lazy(ref, cache):
    """`jkmount index REF --push`: the index's size against the image's compressed layers."""
    said = sh(JK, "--cache-dir", cache, "index", ref, "--push", capture_output=True, text=True)
    line = next(l for l in said.stderr.splitlines() if l.startswith("indexed"))
    index_bytes, layer_bytes = [int(w) for w in line.split() if w.isdigit()][-2:]
    return index_bytes, layer_bytes


class Passthrough(Jkmount):
    """jkmount with `--passthrough`, mounted from the cache of `of` (a Jkmount that has done its
    cold mount) at a mountpoint of its own: the kernel reads big files from backing files."""

    name = "jkmount --passthrough"

    def __init__(self, of):
        self.ref, self.dir, self.cache = of.ref, of.dir, of.cache
        self.mnt = self.dir / "mnt-passthrough"
        self.mnt.mkdir(parents=True, exist_ok=True)

    def _mount(self):
        sh(JK, "-q", "--cache-dir", self.cache, "--passthrough", self.ref, self.mnt)


def split_passthrough(cells):
    """A row's cells without passthrough's, and native beside passthrough's as `jkmount`."""
    jkp = cells.pop(Passthrough.name)
    return cells, {"native": cells["native"], "jkmount": jkp}


class SkopeoUmoci:
    name = "skopeo+umoci"

    def __init__(self, ref, key):
        self.ref, self.dir = ref, WORK / "umoci" / key

    def root(self):
        return self.dir / "rootfs"

    def cold(self, probe):
        return self.cold_then(lambda root: lambda: (root / probe).stat())

    def cold_then(self, workload_for):
        """From nothing to the end of `workload_for(root)` on the unpacked tree."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

        def run():
            sh("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{self.ref}",
               f"oci:{self.dir / 'layout'}:t")
            sh("umoci", "raw", "unpack", "--image", f"{self.dir / 'layout'}:t", self.root(),
               stderr=subprocess.DEVNULL)
            workload_for(self.root())()
        return timed(run)

    warm = None

    def stop(self):
        pass


class Podman:
    name = "podman image mount"

    def __init__(self, ref, key):
        self.ref, self.dir = ref, WORK / "podman" / key
        self.path = None

    def _podman(self, *args, **kw):
        return out("podman", "--root", self.dir / "root", "--runroot", self.dir / "run",
                   "--storage-driver", "overlay", *args, **kw)

    def root(self):
        return Path(self.path)

    def cold(self, probe):
        return self.cold_then(lambda root: lambda: (root / probe).stat())

    def cold_then(self, workload_for):
        """From nothing to the end of `workload_for(root)` through `podman image mount`."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

        def run():
            self._podman("pull", "-q", "--tls-verify=false", self.ref)
            self.path = self._podman("image", "mount", self.ref).strip()
            workload_for(Path(self.path))()
        return timed(run)

    def warm(self, probe):
        self._podman("image", "unmount", "--all")

        def run():
            self.path = self._podman("image", "mount", self.ref).strip()
            (Path(self.path) / probe).stat()
        return timed(run)

    def stop(self):
        if (self.dir / "root").is_dir():
            self._podman("image", "unmount", "--all", check=False)


def copy_layers(ref, dest):
    """skopeo copy to a dir: layout; returns the layer blob paths, bottom first."""
    sh("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"dir:{dest}")
    manifest = json.loads((dest / "manifest.json").read_text())
    return [dest / layer["digest"].split(":")[1] for layer in manifest["layers"]]


class FuseOverlayfs(MountTool):
    """fuse-overlayfs over the layers as GNU tar extracts them."""

    name = subdir = "fuse-overlayfs"

    def _fetch(self):
        for i, blob in enumerate(copy_layers(self.ref, self.dir / "blobs")):
            layer = self.dir / "layers" / str(i)
            layer.mkdir(parents=True)
            sh("tar", "-xzf", blob, "-C", layer)

    def lowerdir(self):
        """The extracted layers as fuse-overlayfs's `lowerdir` (top first)."""
        n = len(list((self.dir / "layers").iterdir()))
        return ":".join(str(self.dir / "layers" / str(i)) for i in reversed(range(n)))

    def _mount(self):
        sh("fuse-overlayfs", "-o", f"lowerdir={self.lowerdir()}", self.mnt)


class Ratarmount(MountTool):
    """ratarmount over the compressed layer blobs, in order (later layers win)."""

    name = subdir = "ratarmount"

    def _fetch(self):
        self.blobs = copy_layers(self.ref, self.dir / "blobs")

    def _mount(self):
        sh("ratarmount", "--index-folders", self.dir / "index", *self.blobs, self.mnt,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def node_command(root):
    """`node` requiring the big packages from the image's modules: (argv, env)."""
    script = "for (const m of %s) require(m)" % json.dumps(REQUIRED)
    return ["node", "-e", script], {**os.environ, "NODE_PATH": str(root / "jk" / "modules")}


def node_workload(root):
    argv, env = node_command(root)
    return lambda: sh(*argv, env=env)


def page_workload(root):
    """What a web server does first: the site's front page."""
    return lambda: (root / "jk" / "modules" / "index.html").read_bytes()


def find_workload(root):
    return lambda: sh("find", root, "-type", "f", stdout=subprocess.DEVNULL)


def tar_workload(root):
    return lambda: sh("sh", "-c", f"tar -C '{root}' -cf - . | wc -c", stdout=subprocess.DEVNULL)


PROBE = "jk/modules/typescript/package.json"


class Native:
    """The same tree extracted on this disk (umoci's rootfs): what every ratio is against."""

    name = "native"
    warm = None

    def __init__(self, root):
        self._root = root

    def root(self):
        return self._root


def smaps(pid):
    """The process's memory in MiB as smaps_rollup sums it: Rss, Pss, Anonymous."""
    got = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        got[key] = int(value.split()[0]) / 1024
    return got


def peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def wait_complete(cache, mnt, limit=300):
    """Returns once every lazy layer of the mount at `mnt` is complete, checked and in the
    cache, as `jkmount status` says (polled every 100 ms, at most `limit` seconds)."""
    deadline, said = time.monotonic() + limit, ""
    while time.monotonic() < deadline:
        said = out(JK, "--cache-dir", cache, "status", mnt)
        m = re.search(r"(\d+) of (\d+) lazy layers complete, (\d+) checked and in the cache", said)
        if m and m.group(2) == m.group(3):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{mnt}: not complete in the cache after {limit} s: {said.strip()}")


def first_and_second(tools, label, workload, probe=None):
    """For each tool, the first run after a fresh mount with the page cache dropped and the run
    right after it. Runs are interleaved (run 1 of every tool, then run 2, ...) so that drift of
    the machine (disk, reclaim) falls on all tools alike. A tool that fails is reported failed."""
    firsts = {t.name: [] for t in tools}
    seconds = {t.name: [] for t in tools}
    failed = {}
    for _ in range(RUNS):
        for tool in tools:
            if tool.name in failed:
                continue

            def run(tool=tool):
                if tool.warm is not None:
                    tool.warm(probe or PROBE)
                drop_caches()
                firsts[tool.name].append(timed(workload(tool.root())))
                seconds[tool.name].append(timed(workload(tool.root())))
            got = attempt(f"{tool.name} {label}", run)
            if isinstance(got, str):
                failed[tool.name] = got
    pick = lambda samples: {n: failed.get(n) or Result(v) for n, v in samples.items()}  # noqa: E731
    return pick(firsts), pick(seconds)


def median(cells, name):
    v = cells.get(name)
    return v.median if isinstance(v, Result) else None
