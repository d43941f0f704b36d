#!/usr/bin/env python3
"""make bench: jkmount side by side, in one run, with the same tree on native disk and with the
tools people use today: skopeo + umoci unpack, podman image mount, fuse-overlayfs over extracted
layers, ratarmount over the layer blobs; and writes into a writable mount beside native disk and
fuse-overlayfs with an upper (bench/writes.py). Builds its images from real npm packages with
`jkmount pack`, serves them from a docker-registry on 127.0.0.1, prints ratios to native and
writes docs/benchmarks.md. Timings are medians of BENCH_RUNS runs (default 3) with min-max;
"first" rows drop the page cache and mount afresh. Needs root (drop_caches, mounts).

Environment: BENCH_RUNS, BENCH_SKIP_INSTALL=1 (use what is installed), BENCH_OUT (markdown),
BENCH_ONLY=lazy (only the lazy-mount rows and targets, printed, docs left alone), BENCH_ONLY=mounts
(only the 5 and 50 mounts rows and the keeper's 1, 10 and 50 volumes, printed),
BENCH_ONLY=completed (only the rows read through lazy mounts once complete, beside eager ones,
printed), BENCH_ONLY=warm (only the warm-mount rows and their targets, printed).
"""

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import link
import writes
from common import (JK, OUT, ROOT, RUNS, WORK, Result, attempt, count_files, drop_caches, du,
                    free_port, log, out, samples, sh, timed, unmount, version, wait_for_port)

NPM_PACKAGES = [
    "typescript@5.6.3", "webpack@5.96.1", "@babel/core@7.26.0", "@babel/preset-env@7.26.0",
    "eslint@9.15.0", "jest@29.7.0", "rxjs@7.8.1", "lodash@4.17.21", "@mui/material@6.1.8",
    "react@18.3.1", "react-dom@18.3.1", "date-fns@4.1.0", "@fortawesome/free-solid-svg-icons@6.7.1",
    "core-js@3.39.0",
]
REQUIRED = ["typescript", "webpack", "@babel/core", "eslint", "jest"]
APT = ["podman", "fuse-overlayfs", "wrk", "umoci", "skopeo", "nginx-light", "docker-registry"]


# ---------------------------------------------------------------- setup


def install():
    if os.environ.get("BENCH_SKIP_INSTALL"):
        return
    missing = [p for p in APT if sh("dpkg", "-s", p, capture_output=True, check=False).returncode]
    if missing:
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if shutil.which("ratarmount") is None:
        sh(sys.executable, "-m", "pip", "install", "-q", "ratarmount==1.3.0")


def npm_tree():
    """node_modules of real packages (npm registry), installed once."""
    dest = WORK / "npm"
    if not (dest / "node_modules" / "core-js").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "package.json").write_text('{"name": "bench", "private": true}\n')
        sh("npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", dest,
           *NPM_PACKAGES)
    return dest / "node_modules"


def generated_tree(dest, dirs, files_per_dir):
    if dest.is_dir():
        return dest
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in range(dirs):
        sub = tmp / f"d{d:03}"
        sub.mkdir(parents=True)
        for f in range(files_per_dir):
            (sub / f"f{f:04}.js").write_text(f"module.exports = {d * files_per_dir + f};\n")
    tmp.rename(dest)
    return dest


def big_files(dest):
    if dest.is_dir():
        return dest
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "random.bin", "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    line = b"The quick brown fox jumps over the lazy dog, 0123456789.\n"
    block = line * ((1 << 20) // len(line) + 1)
    with open(tmp / "text.txt", "wb") as f:
        for _ in range(256):
            f.write(block[: 1 << 20])
    tmp.rename(dest)
    return dest


def media_site(dest):
    """The static site with 512 MiB of media beside it (incompressible: video and images are
    compressed already): the lazy rows' image of over 500 MB."""
    if dest.is_dir():
        return dest
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(static_site(WORK / "src-site"), tmp)
    for i in range(32):
        path = tmp / "media" / f"clip{i:02}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(16):
                f.write(os.urandom(1 << 20))
    tmp.rename(dest)
    return dest


def static_site(dest, pages=3000):
    if dest.is_dir():
        return dest
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(pages):
        page = tmp / f"section{i % 30:02}" / f"page{i:05}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"<p>Paragraph {j} of page {i}.</p>\n" for j in range(20))
        page.write_text(f"<!doctype html><title>Page {i}</title>\n{body}")
    (tmp / "index.html").write_text("<!doctype html><title>Site</title><p>Hello</p>\n")
    tmp.rename(dest)
    return dest


class Registry:
    def __init__(self):
        self.dir = WORK / "registry"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.addr = f"127.0.0.1:{free_port()}"
        config = self.dir / "config.yml"
        config.write_text(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
            f"{self.dir / 'storage'}\nhttp:\n  addr: {self.addr}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(int(self.addr.split(":")[1]), "docker-registry")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def pack_layers(groups, ref, registry_cache, compression="gzip", prefetch=None):
    """Packs each directory of `groups` as one layer on top of the previous: one image."""
    base = None
    for i, group in enumerate(groups):
        tag = ref if i == len(groups) - 1 else f"{ref}-part{i}"
        cmd = [JK, "-q", "--cache-dir", registry_cache, "pack", group, "--tag", tag,
               "--compression", compression]
        if prefetch:
            cmd += ["--prefetch-from", prefetch]
        if base:
            cmd += ["--base", base]
        sh(*cmd, stdout=subprocess.DEVNULL)
        base = tag
    return ref


def split_into_layers(tree, dest, n):
    """Hardlinks the top-level entries of `tree` into `n` directories of similar size."""
    if dest.is_dir():
        return sorted(dest.iterdir())
    tmp = dest.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    entries = sorted(tree.iterdir(), key=lambda p: -du(p))
    sizes = [0] * n
    for entry in entries:
        i = sizes.index(min(sizes))
        sizes[i] += du(entry)
        target = tmp / f"layer{i}" / entry.name
        target.parent.mkdir(parents=True, exist_ok=True)
        sh("cp", "-al", entry, target)
    tmp.rename(dest)
    return sorted(dest.iterdir())


# ---------------------------------------------------------------- the tools


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


def completed_workloads():
    return [("node require of 5 packages", node_workload), ("find -type f", find_workload),
            ("tar -cf - . | wc -c", tar_workload)]


def completed_rows(large, large_table):
    """The read rows through a lazy mount once its background pass has completed, beside an
    eager mount of the same image, interleaved in one run: the gzip image through its jkmount
    index (the cache's content.tar takes the layers' reads over) and the eStargz image from its
    own tables (served from the table's layout to the end)."""
    rows = []
    pairs = [(Jkmount(large, "completed"), LazyCompleted(large, "completed-lazy")),
             (EagerTable(large_table, "completed-table"),
              LazyTableCompleted(large_table, "completed-table-lazy"))]
    tools = [t for pair in pairs for t in pair]
    for tool in tools:
        unmount(tool.mnt)
        shutil.rmtree(tool.dir, ignore_errors=True)
        tool.mnt.mkdir(parents=True)
    try:
        for label, workload in completed_workloads():
            log(f"{label}: eager mounts and lazy ones once complete")
            first, second = first_and_second(tools, label, workload)
            for which, cells in (("first after mount", first), ("second", second)):
                for tool in tools:
                    rows.append((completed_row(label, which, tool.name),
                                 {"jkmount": cells[tool.name]}))
    finally:
        for tool in tools:
            attempt(f"stopping {tool.name}", tool.stop)
    return rows


def completed_row(label, which, name):
    return f"{label}, {which}: {name} (once-complete rows)"


def completed_targets(by, add):
    """Once the background pass completes, every read row through the lazy mount equals the
    eager mount's: here within 10 % (the spread of these rows between runs)."""
    for eager, lazy in ((Jkmount, LazyCompleted), (EagerTable, LazyTableCompleted)):
        for label, _ in completed_workloads():
            for which in ("first after mount", "second"):
                e = median(by.get(completed_row(label, which, eager.name), {}), "jkmount")
                z = median(by.get(completed_row(label, which, lazy.name), {}), "jkmount")
                add(f"{label}, {which}: {lazy.name} ≤ 1.1× {eager.name}",
                    z / e if z and e else None, 1.1)


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


# ---------------------------------------------------------------- measurements


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


PROBE = "jk/modules/typescript/package.json"


class Native:
    """The same tree extracted on this disk (umoci's rootfs): what every ratio is against."""

    name = "native"
    warm = None

    def __init__(self, root):
        self._root = root

    def root(self):
        return self._root


def wrk(root, port_dir):
    """nginx serving `root` on 127.0.0.1, loaded by wrk: (requests/s, p99 ms)."""
    port = free_port()
    conf = port_dir / "nginx.conf"
    port_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        f"user root;\nworker_processes 2;\npid {port_dir}/nginx.pid;\nerror_log {port_dir}/error.log;\n"
        f"daemon off;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; sendfile on; server {{ listen 127.0.0.1:{port}; "
        f"root {root}; }} }}\n")
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(port_dir)])
    try:
        wait_for_port(port, "nginx")
        urls = port_dir / "urls.lua"
        pages = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.html"))[:2000]
        urls.write_text(
            "local paths = {" + ",".join(json.dumps("/" + p) for p in pages) + "}\n"
            "local i = 0\nrequest = function()\n i = i % #paths + 1\n"
            " return wrk.format(nil, paths[i])\nend\n")
        said = out("wrk", "-t2", "-c32", "-d5s", "--latency", "-s", urls,
                   f"http://127.0.0.1:{port}/")
        rps = float(next(l.split()[1] for l in said.splitlines() if l.startswith("Requests/sec")))
        p99 = next(l.split()[1] for l in said.splitlines() if l.strip().startswith("99%"))
        p99_ms = float(p99[:-2]) if p99.endswith("ms") else (
            float(p99[:-2]) / 1000 if p99.endswith("us") else float(p99[:-1]) * 1000)
        return rps, p99_ms
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait()


def concurrent(root, k):
    """k node workloads at once: workloads per second."""
    argv, env = node_command(root)

    def run():
        procs = [subprocess.Popen(argv, env=env) for _ in range(k)]
        if any([p.wait() != 0 for p in procs]):
            raise RuntimeError(f"a node workload failed under {root}")
    node_workload(root)()  # warm
    return Result([k / timed(run) for _ in range(RUNS)], unit="workloads/s")


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


def main():
    install()
    WORK.mkdir(parents=True, exist_ok=True)
    sh("make", "-s", "release", cwd=ROOT)
    tree = npm_tree()
    layers = split_into_layers(tree, WORK / "layers", 5)
    n_files = count_files(tree)
    registry = Registry()
    rows = []
    tools = []
    try:
        cache = WORK / "pack-cache"
        shutil.rmtree(cache, ignore_errors=True)
        reg = registry.addr
        log(f"packing {n_files} files of npm packages as 5 layers")
        large = pack_layers(layers, f"{reg}/bench/large:1", cache)
        if os.environ.get("BENCH_ONLY") == "mounts":
            jk = Jkmount(large, "large")
            jk.cold(PROBE)
            try:
                for label, cells in mounts_rows(jk):
                    print(label, {k: v.shown() for k, v in cells.items()})
            finally:
                jk.stop()
            return
        if os.environ.get("BENCH_ONLY") == "warm":
            rows, tools = warm_rows(large, reg, cache)
            try:
                for label, cells in rows:
                    print(label, {k: v.shown() for k, v in cells.items()})
                for text, figure, ok in targets(rows, 0):
                    if "warm" in text:
                        print(f"target: {text}: {figure} ({'met' if ok else 'missed'})")
            finally:
                for t in tools:
                    attempt(f"stopping {t.name}", t.stop)
            return
        log("packing the same layers as eStargz")
        large_estargz = pack_layers(layers, f"{reg}/bench/large-estargz:1", cache, "estargz")
        log("packing them as eStargz again, the files the require workload reads listed first")
        listed = workload_files(WORK / "prefetch.txt")
        large_prefetch = pack_layers(layers, f"{reg}/bench/large-prefetch:1", cache, "estargz",
                                     prefetch=listed)
        log("packing the eStargz layers again, under a name that gets no jkmount index")
        large_table = pack_layers(layers, f"{reg}/bench/large-table:1", cache, "estargz")
        log("recompressing the large image as zstd:chunked with skopeo")
        large_chunked = zstd_chunked_copy(large, f"{reg}/bench/large-chunked:1")
        large_estargz = (large_estargz, large_prefetch, large_table, large_chunked)
        if os.environ.get("BENCH_ONLY") == "completed":
            index_for_lazy(large, WORK / "lazy-index-cache")
            rows = completed_rows(large, large_table)
            met = []
            completed_targets(dict(rows), lambda text, r, limit, fmt="{:.2f}×": met.append(
                (text, "not measured" if r is None else fmt.format(r), r is not None and r <= limit)))
            for label, cells in rows:
                print(label, {k: v.shown() for k, v in cells.items()})
            for text, figure, ok in met:
                print(f"target: {text}: {figure} ({'met' if ok else 'missed'})")
            return
        if os.environ.get("BENCH_ONLY") == "lazy":
            lazy = lazy_rows(registry, large, large_estargz, WORK / "lazy-index-cache")
            lazy += completed_rows(large, large_table)
            met = []
            lazy_targets(dict(lazy), lambda text, r, limit, fmt="{:.2f}×": met.append(
                (text, "not measured" if r is None else fmt.format(r), r is not None and r <= limit)))
            for text, figure, ok in met:
                lazy.append((f"target: {text}: {figure} ({'met' if ok else 'missed'})", {}))
            for label, cells in lazy:
                print(label, {k: v.shown() for k, v in cells.items()})
            return
        small = pack_layers([generated_tree(WORK / "src-1k", 10, 100)], f"{reg}/bench/small:1", cache)
        huge = pack_layers([generated_tree(WORK / "src-100k", 100, 1000)], f"{reg}/bench/huge:1", cache)
        bigf = pack_layers([big_files(WORK / "src-big")], f"{reg}/bench/big:1", cache)
        site = pack_layers([static_site(WORK / "src-site")], f"{reg}/bench/site:1", cache)
        size = du(tree)

        jk = Jkmount(large, "large")
        umoci = SkopeoUmoci(large, "large")
        peers = [Podman(large, "large"), FuseOverlayfs(large, "large"), Ratarmount(large, "large")]
        tools = [jk, umoci, *peers]
        log("cold mounts")
        cold = {t.name: attempt(f"{t.name} cold", lambda t=t: samples(lambda: t.cold(PROBE)))
                for t in tools}
        log("warm mounts")
        warm = {t.name: attempt(f"{t.name} warm", lambda t=t: samples(lambda: t.warm(PROBE)))
                for t in tools if t.warm is not None}
        rows.append(("cold mount (empty cache → file readable)", cold))
        rows.append(("warm mount (all cached → mount live)", warm))
        rows.append(("warm mount, tree file evicted from the page cache",
                     {"jkmount": samples(lambda: jk.warm_evicted(PROBE))}))

        log("cold mounts over a 100 Mbit/s link with 20 ms RTT")
        shaped = link.Link(registry.dir / "storage")
        with shaped.inside():
            rows += link.rows(shaped, large, lambda ref: [Jkmount(ref, "link"),
                                                          SkopeoUmoci(ref, "link"),
                                                          Podman(ref, "link")], PROBE, RUNS)
        rows += lazy_rows(registry, large, large_estargz, jk.cache)
        rows += completed_rows(large, large_table)

        native = Native(umoci.root())

        jkp = Passthrough(jk)
        tools += [jkp]
        readers = [native, jk, *peers, jkp]
        passthrough_rows = []
        for label, workload in [("node require of 5 packages", node_workload),
                                ("find -type f", find_workload),
                                ("tar -cf - . | wc -c", tar_workload)]:
            log(label)
            first, second = first_and_second(readers, label, workload)
            (first, pfirst), (second, psecond) = split_passthrough(first), split_passthrough(second)
            rows.append((f"{label}, first after mount", first))
            rows.append((f"{label}, second", second))
            passthrough_rows.append((f"{label}, first after mount, --passthrough", pfirst))
            passthrough_rows.append((f"{label}, second, --passthrough", psecond))
        rows += passthrough_rows
        jkp.stop()

        pid = jk.server_pid()
        rss = peak_rss_mib(pid) if pid else None
        rows.append(("jkmount daemon peak RSS (after tar read every file twice)",
                     {"jkmount": Result([rss], unit="MiB") if rss else "unknown"}))
        anon = smaps(pid)["Anonymous"] if pid else None
        rows.append(("jkmount daemon anonymous memory (smaps_rollup, same moment)",
                     {"jkmount": Result([anon], unit="MiB") if anon else "unknown"}))

        rows += mounts_rows(jk)

        log("writes into a writable node_modules")
        rows += writes.measure(jk, peers[1], umoci.root(), tree.parent,
                               generated_tree(WORK / "src-5k", 50, 100))

        log("concurrent node workloads")
        jk.warm(PROBE)
        conc = {k: concurrent(jk.root(), k) for k in (1, 2, 4)}
        nconc = {k: concurrent(native.root(), k) for k in (1, 2, 4)}
        for k in (1, 2, 4):
            rows.append((f"{k} concurrent node workloads (throughput)",
                         {"native": nconc[k], "jkmount": conc[k]}))

        log("big files")
        jkb, umb = Jkmount(bigf, "big"), SkopeoUmoci(bigf, "big")
        tools += [jkb]
        umb.cold("jk/modules/text.txt")
        jkb.cold("jk/modules/text.txt")
        for name in ("random.bin", "text.txt"):
            seq = lambda root, name=name: (lambda: sh("dd", f"if={root / 'jk/modules' / name}",
                                                      "of=/dev/null", "bs=1M", "status=none"))
            first, second = first_and_second([Native(umb.root()), jkb, Passthrough(jkb)], name,
                                             seq, "jk/modules/text.txt")
            (first, pfirst), (second, psecond) = split_passthrough(first), split_passthrough(second)
            rows.append((f"sequential read of a 256 MiB {name}, first", first))
            rows.append((f"sequential read of a 256 MiB {name}, second", second))
            rows.append((f"sequential read of a 256 MiB {name}, first, --passthrough", pfirst))
            rows.append((f"sequential read of a 256 MiB {name}, second, --passthrough", psecond))
        Passthrough(jkb).stop()

        log("nginx")
        jks, ums = Jkmount(site, "site"), SkopeoUmoci(site, "site")
        tools += [jks]
        ums.cold("jk/modules/index.html")
        jks.cold("jk/modules/index.html")
        served = {"native": ums.root() / "jk/modules", "jkmount": jks.root() / "jk/modules"}
        said = {name: [] for name in served}
        for _ in range(RUNS):  # interleaved, as the other rows
            for name, root in served.items():
                said[name].append(wrk(root, WORK / f"nginx-{name}"))
        rows.append(("nginx + wrk on 3,000 pages: requests/s",
                     {n: Result([rps for rps, _ in v], "req/s") for n, v in said.items()}))
        rows.append(("nginx + wrk: p99 latency",
                     {n: Result([p99 / 1000 for _, p99 in v]) for n, v in said.items()}))

        log("1k and 100k files")
        for label, ref, probe in [("1k-file image", small, "jk/modules/d000/f0000.js"),
                                  ("100k-file image", huge, "jk/modules/d000/f0000.js")]:
            t = Jkmount(ref, label.split()[0])
            u = SkopeoUmoci(ref, label.split()[0])
            f = FuseOverlayfs(ref, label.split()[0])
            tools += [t, f]
            rows.append((f"{label}: cold mount", {
                "jkmount": samples(lambda: t.cold(probe)),
                "skopeo+umoci": samples(lambda: u.cold(probe)),
                "fuse-overlayfs": attempt("fo", lambda: samples(lambda: f.cold(probe)))}))
            rows.append((f"{label}: warm mount", {
                "jkmount": samples(lambda: t.warm(probe)),
                "fuse-overlayfs": attempt("fo", lambda: samples(lambda: f.warm(probe)))}))
    finally:
        for t in tools:
            attempt(f"stopping {t.name}", t.stop)
        registry.stop()
    versions = {
        "jkmount": version([JK, "--version"]),
        "skopeo": version(["skopeo", "--version"]),
        "umoci": version(["umoci", "--version"]),
        "podman": version(["podman", "--version"]),
        "fuse-overlayfs": version(["fuse-overlayfs", "--version"], pick="fuse-overlayfs"),
        "ratarmount": version(["ratarmount", "--version"]),
        "node": version(["node", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "--version"], pick="wrk"),
    }
    n_entries = int(out("sh", "-c", f"find '{tree}' | wc -l").strip())
    report(rows, n_files, size, rss, n_entries, versions)


COLUMNS = ["native", "jkmount", "skopeo+umoci", "podman image mount", "fuse-overlayfs",
           "ratarmount"]


def median(cells, name):
    v = cells.get(name)
    return v.median if isinstance(v, Result) else None


def targets(rows, n_entries):
    """Each target of the issue, from this run: (target, figure, met)."""
    by = dict(rows)
    out_ = []

    def ratio(row, a, b):
        x, y = median(by.get(row, {}), a), median(by.get(row, {}), b)
        return x / y if x and y else None

    def add(text, r, limit, fmt="{:.2f}×", higher_is_better=False):
        if r is None:
            out_.append((text, "not measured", False))
        else:
            ok = r >= limit if higher_is_better else r <= limit
            out_.append((text, fmt.format(r), ok))

    cold = "cold mount (empty cache → file readable)"
    add("cold mount ≤ 0.25× skopeo+umoci", ratio(cold, "jkmount", "skopeo+umoci"), 0.25)
    jk_cold = median(by.get(cold, {}), "jkmount")
    peers = [median(by[cold], n) for n in COLUMNS[2:] if median(by.get(cold, {}), n)]
    out_.append(("cold mount faster than every peer",
                 f"{jk_cold:.2f} s vs fastest peer {min(peers):.2f} s" if jk_cold and peers else "not measured",
                 bool(jk_cold and peers and jk_cold < min(peers))))
    over = next((row for row in by if row.startswith("link ") and "cold mount" in row), None)
    alone = next((row for row in by if row.startswith("link ") and "bytes alone" in row), None)
    jk_link, bytes_alone = median(by.get(over, {}), "jkmount"), median(by.get(alone, {}), "jkmount")
    add("cold mount over the 100 Mbit/s link ≤ 1.1× its compressed bytes alone",
        jk_link / bytes_alone if jk_link and bytes_alone else None, 1.1)
    add("cold mount over the 100 Mbit/s link ≤ 0.3× skopeo+umoci", ratio(over, "jkmount", "skopeo+umoci"), 0.3)
    warm = "warm mount (all cached → mount live)"
    add("warm mount ≤ 1.0× fuse-overlayfs remount", ratio(warm, "jkmount", "fuse-overlayfs"), 1.0)
    evicted = median(by.get("warm mount, tree file evicted from the page cache", {}), "jkmount")
    fo_warm = median(by.get(warm, {}), "fuse-overlayfs")
    add("warm mount, tree file evicted ≤ 1.0× fuse-overlayfs remount",
        evicted / fo_warm if evicted and fo_warm else None, 1.0)
    w100k = median(by.get("100k-file image: warm mount", {}), "jkmount")
    w1k = median(by.get("1k-file image: warm mount", {}), "jkmount")
    add("warm mount of 100k files ≤ 1.2× that of 1k files", w100k / w1k if w100k and w1k else None, 1.2)
    for label, first, second in [("node require of 5 packages", 1.10, 1.03),
                                 ("find -type f", 1.5, 1.1), ("tar -cf - . | wc -c", 1.5, 1.1)]:
        add(f"{label}: first ≤ {first}× native", ratio(f"{label}, first after mount", "jkmount", "native"), first)
        add(f"{label}: second ≤ {second}× native", ratio(f"{label}, second", "jkmount", "native"), second)
    for name in ("random.bin", "text.txt"):
        for which, limit in (("first", 0.8), ("second", 0.95)):
            r = ratio(f"sequential read of a 256 MiB {name}, {which}", "native", "jkmount")
            add(f"big file {name} read speed, {which} ≥ {limit}× native", r, limit, higher_is_better=True)
        for which, limit in (("first", 0.9), ("second", 0.95)):
            r = ratio(f"sequential read of a 256 MiB {name}, {which}, --passthrough", "native", "jkmount")
            add(f"big file {name} read speed with --passthrough, {which} ≥ {limit}× native", r, limit,
                higher_is_better=True)
    r = ratio("nginx + wrk on 3,000 pages: requests/s", "jkmount", "native")
    add("nginx requests/s ≥ 0.9× native", r, 0.9, higher_is_better=True)
    rss = median(by.get("jkmount daemon peak RSS (after tar read every file twice)", {}), "jkmount")
    limit = 8 + 256 * n_entries / 2**20
    out_.append((f"daemon peak RSS ≤ 8 MiB + 256 B × {n_entries:,} entries = {limit:.1f} MiB",
                 f"{rss:.1f} MiB" if rss else "not measured", bool(rss and rss <= limit)))
    anon = median(by.get("jkmount daemon anonymous memory (smaps_rollup, same moment)", {}), "jkmount")
    limit = 4 + 64 * n_entries / 2**20
    out_.append((f"daemon anonymous memory ≤ 4 MiB + 64 B × {n_entries:,} entries = {limit:.1f} MiB",
                 f"{anon:.1f} MiB" if anon else "not measured", bool(anon and anon <= limit)))
    p5 = median(by.get("5 mounts of the large image: total Pss of the servers", {}), "jkmount")
    p50 = median(by.get("50 mounts of the large image: total Pss of the servers", {}), "jkmount")
    add("50 mounts of one image: total Pss ≤ 3× that of 5 mounts", p50 / p5 if p5 and p50 else None, 3)
    one = median(by.get("1 concurrent node workloads (throughput)", {}), "jkmount")
    four = median(by.get("4 concurrent node workloads (throughput)", {}), "jkmount")
    add("4 concurrent workloads ≥ 1.6× the throughput of one", four / one if four and one else None,
        1.6, higher_is_better=True)
    lazy_targets(by, add)
    writes.targets(by, ratio, add)
    return out_


def warm_rows(large, reg, cache):
    """Only the warm-mount rows (BENCH_ONLY=warm): the large image through jkmount and
    fuse-overlayfs, the tree file evicted, and the 1k- and 100k-file images. Returns (rows,
    the tools to stop)."""
    jk, fo = Jkmount(large, "large"), FuseOverlayfs(large, "large")
    tools = [jk, fo]
    for t in tools:
        t.cold(PROBE)
    rows = [("warm mount (all cached → mount live)",
             {t.name: samples(lambda t=t: t.warm(PROBE)) for t in tools}),
            ("warm mount, tree file evicted from the page cache",
             {"jkmount": samples(lambda: jk.warm_evicted(PROBE))})]
    probe = "jk/modules/d000/f0000.js"
    for label, src, dirs, files in [("1k-file image", "src-1k", 10, 100),
                                    ("100k-file image", "src-100k", 100, 1000)]:
        ref = pack_layers([generated_tree(WORK / src, dirs, files)],
                          f"{reg}/bench/{label.split('-')[0]}:1", cache)
        t = Jkmount(ref, label.split()[0])
        t.cold(probe)
        tools.append(t)
        rows.append((f"{label}: warm mount", {"jkmount": samples(lambda: t.warm(probe))}))
    return rows, tools


def mounts_rows(jk):
    """5 and 50 mounts of one image from `jk`'s warm cache, and 1, 10 and 50 CSI volumes of
    it held by the keeper: the time to mount them all, the total Pss of the server processes
    (and the keeper), and how many processes serve them."""
    log("5 and 50 mounts of one image")
    # Its own mount unmounted first: the mounts below would be served by its server otherwise,
    # which has read the whole tree (the rows above) and is no measure of a mount's cost.
    jk.stop()
    rows = []
    for n in (5, 50):
        took, pss, servers = jk.many(n, PROBE)
        rows.append((f"{n} mounts of the large image: time to mount all",
                     {"jkmount": Result([took])}))
        rows.append((f"{n} mounts of the large image: total Pss of the servers",
                     {"jkmount": Result([pss], unit="MiB")}))
        rows.append((f"{n} mounts of the large image: server processes",
                     {"jkmount": Result([servers], unit="")}))
    log("1, 10 and 50 CSI volumes of one image, held by the keeper")
    for n in (1, 10, 50):
        took, pss, servers = jk.volumes(n, PROBE)
        rows.append((f"{n} CSI volumes of the large image: time to mount all (keeper)",
                     {"jkmount": Result([took])}))
        rows.append((f"{n} CSI volumes of the large image: total Pss of keeper and servers",
                     {"jkmount": Result([pss], unit="MiB")}))
        rows.append((f"{n} CSI volumes of the large image: server processes",
                     {"jkmount": Result([servers], unit="")}))
    return rows


def lazy_rows(registry, large, estargz_images, index_cache):
    """The lazy-mount rows: the index's cost and what the workload reads, then the first
    require from an empty cache over the 100 and 20 Mbit/s links — eager jkmount, --lazy,
    skopeo+umoci and podman; and the same layers packed as eStargz, eager and --lazy — with
    the bytes over the link by then."""
    log("lazy indexes of the large image, gzip and eStargz")
    large_estargz, large_prefetch, large_table, large_chunked = estargz_images
    index_bytes, layer_bytes = index_for_lazy(large, index_cache)
    estargz_index, estargz_bytes = index_for_lazy(large_estargz, index_cache)
    prefetch_index, prefetch_bytes = index_for_lazy(large_prefetch, index_cache)
    rows = [("lazy index (jkmount index --push) of the large image: % of its compressed layers",
             {"jkmount": Result([100 * index_bytes / layer_bytes], unit="%")}),
            ("the large image's compressed layers",
             {"jkmount": Result([layer_bytes / 2**20], unit="MiB")}),
            ("lazy index of the large image packed as eStargz: % of its compressed layers",
             {"jkmount": Result([100 * estargz_index / estargz_bytes], unit="%")}),
            ("the large image's compressed layers, packed as eStargz",
             {"jkmount": Result([estargz_bytes / 2**20], unit="MiB")}),
            ("the large image's compressed layers, packed as eStargz with a prefetch list",
             {"jkmount": Result([prefetch_bytes / 2**20], unit="MiB")}),
            ("lazy index of the large image packed as eStargz with a prefetch list: % of its compressed layers",
             {"jkmount": Result([100 * prefetch_index / prefetch_bytes], unit="%")}),
            ("the large image's compressed layers, recompressed as zstd:chunked by skopeo",
             {"jkmount": Result([layer_bytes_of(large_chunked) / 2**20], unit="MiB")}),
            ("what the require workload reads: % of the tree's uncompressed file bytes",
             {"jkmount": Result([workload_share()], unit="%")})]
    for rate in (100, 20):
        log(f"first require over a {rate} Mbit/s link with 20 ms RTT, eager and --lazy")
        shaped = link.Link(registry.dir / "storage", rate_mbit=rate)
        with shaped.inside():
            rows += link.first_result_rows(shaped, large, lambda ref: [
                Jkmount(ref, "link"), Lazy(ref, "link-lazy"), LazyOnRead(ref, "link-lazy-onread"),
                SkopeoUmoci(ref, "link-first"), Podman(ref, "link-first")],
                node_workload, RUNS)
            rows += link.first_result_rows(shaped, large_estargz, lambda ref: [
                EagerEstargz(ref, "link-estargz"), LazyEstargz(ref, "link-lazy-estargz"),
                LazyOnReadEstargz(ref, "link-lazy-onread-estargz")],
                node_workload, RUNS)
            rows += link.first_result_rows(shaped, large_prefetch, lambda ref: [
                LazyPrefetch(ref, "link-lazy-prefetch")], node_workload, RUNS)
            rows += link.first_result_rows(shaped, large_table, lambda ref: [
                LazyTable(ref, "link-lazy-table")], node_workload, RUNS)
            rows += link.first_result_rows(shaped, large_chunked, lambda ref: [
                EagerChunked(ref, "link-chunked"), LazyChunked(ref, "link-lazy-chunked")],
                node_workload, RUNS)
            rows += link.first_result_rows(shaped, large, lambda ref: [
                Jkmount(ref, "link"), Lazy(ref, "link-lazy")], find_workload, RUNS,
                what="a full find of the tree")
    rows += media_rows(registry, index_cache)
    return rows


def media_rows(registry, index_cache):
    """The image of over 500 MB (the static site and 512 MiB of media) over the 100 Mbit/s
    link: from nothing to its front page and to a full find, eager and --lazy against
    skopeo+umoci and podman, with the bytes over the link by then."""
    log("the static site with 512 MiB of media, packed and indexed")
    media = pack_layers([media_site(WORK / "src-media")], f"{registry.addr}/bench/media:1",
                        WORK / "pack-cache")
    index_bytes, layer_bytes = index_for_lazy(media, index_cache)
    rows = [("the media site image's compressed layers",
             {"jkmount": Result([layer_bytes / 2**20], unit="MiB")}),
            ("lazy index of the media site image: % of its compressed layers",
             {"jkmount": Result([100 * index_bytes / layer_bytes], unit="%")})]
    log("the media site over a 100 Mbit/s link with 20 ms RTT: front page, then a full find")
    shaped = link.Link(registry.dir / "storage", rate_mbit=100)
    with shaped.inside():
        rows += link.first_result_rows(shaped, media, lambda ref: [
            Jkmount(ref, "link-media"), Lazy(ref, "link-lazy-media"),
            SkopeoUmoci(ref, "link-media"), Podman(ref, "link-media")],
            page_workload, RUNS, what="the media site's front page")
        rows += link.first_result_rows(shaped, media, lambda ref: [
            Jkmount(ref, "link-media"), Lazy(ref, "link-lazy-media")],
            find_workload, RUNS, what="a full find of the media site")
    return rows


WORKLOAD_SHARE = """
const fs = require('fs'), path = require('path');
const opened = new Set(), readFileSync = fs.readFileSync;
fs.readFileSync = function (p, ...a) { opened.add(path.resolve(String(p))); return readFileSync.call(this, p, ...a); };
for (const m of %s) require(m);
Object.keys(require.cache).forEach(f => opened.add(f));
const size = f => { try { return fs.statSync(f).size; } catch (e) { return 0; } };
let all = 0;
(function walk(d) { for (const e of fs.readdirSync(d, {withFileTypes: true})) {
  const p = path.join(d, e.name); if (e.isDirectory()) walk(p); else if (e.isFile()) all += size(p); } })(process.argv[1]);
console.log(100 * [...opened].reduce((n, f) => n + size(f), 0) / all);
"""


WORKLOAD_FILES = """
const fs = require('fs'), path = require('path');
const opened = new Set(), readFileSync = fs.readFileSync;
fs.readFileSync = function (p, ...a) { opened.add(path.resolve(String(p))); return readFileSync.call(this, p, ...a); };
for (const m of %s) require(m);
Object.keys(require.cache).forEach(f => opened.add(f));
for (const f of opened) if (f.startsWith(process.argv[1] + '/')) console.log(f.slice(process.argv[1].length + 1));
"""


def workload_files(dest):
    """The files the require workload reads, relative to node_modules, in the order it first
    reads them (a `pack --prefetch-from` list), written to `dest`."""
    modules = (WORK / "npm" / "node_modules").resolve()
    script = WORKLOAD_FILES % json.dumps(REQUIRED)
    out = sh("node", "-e", script, str(modules), capture_output=True, cwd=modules.parent)
    dest.write_bytes(out.stdout)
    return dest


def workload_share():
    """The share of the tree's file bytes the require workload itself reads (the modules node
    loads and the files read through fs.readFileSync), on native disk: the floor for what any
    lazy mount must fetch."""
    modules = WORK / "npm" / "node_modules"
    script = WORKLOAD_SHARE % json.dumps(REQUIRED)
    out = sh("node", "-e", script, str(modules), capture_output=True, cwd=modules.parent)
    return float(out.stdout.decode().strip())


def lazy_targets(by, add):
    """The lazy-mount issue's targets: on the 20 Mbit/s link, the first require through --lazy
    against an eager mount's, and the share of the image fetched by then; the index's cost —
    for the gzip image and for the same layers packed as eStargz."""
    slow = "20 Mbit/s, 20 ms RTT"
    kinds = [("", Jkmount, Lazy, "the large image's compressed layers",
              "lazy index (jkmount index --push) of the large image: % of its compressed layers"),
             (" (eStargz layers)", EagerEstargz, LazyEstargz,
              "the large image's compressed layers, packed as eStargz",
              "lazy index of the large image packed as eStargz: % of its compressed layers"),
             # Against the eager mount of the eStargz image without the list: the same files,
             # sizes within a few KiB (the rows above say).
             (" (eStargz layers, prefetch list)", EagerEstargz, LazyPrefetch,
              "the large image's compressed layers, packed as eStargz with a prefetch list",
              "lazy index of the large image packed as eStargz with a prefetch list: % of its compressed layers"),
             # Served from the layers' own tables: no index to cost anything.
             (" (eStargz layers, own table, no index)", EagerEstargz, LazyTable,
              "the large image's compressed layers, packed as eStargz", None),
             (" (zstd:chunked layers, own table)", EagerChunked, LazyChunked,
              "the large image's compressed layers, recompressed as zstd:chunked by skopeo", None)]
    for kind, eager_tool, lazy_tool, image_row, index_row in kinds:
        eager = median(by.get(link.first_result_row(slow, eager_tool.name), {}), "jkmount")
        lazy = median(by.get(link.first_result_row(slow, lazy_tool.name), {}), "jkmount")
        add(f"first require through --lazy{kind} ≤ 0.3× an eager mount's, 20 Mbit/s link",
            lazy / eager if lazy and eager else None, 0.3)
        fetched = median(by.get(f"link {slow}: MiB over the link by that first result ({lazy_tool.name})",
                                {}), "jkmount")
        image = median(by.get(image_row, {}), "jkmount")
        add(f"--lazy{kind}: < 20 % of the compressed image fetched by the first require",
            100 * fetched / image if fetched and image else None, 20, fmt="{:.1f} %")
        if index_row:
            add(f"lazy index{kind} ≤ 3 % of the compressed layers",
                median(by.get(index_row, {}), "jkmount"), 3, fmt="{:.2f} %")
    completed_targets(by, add)


def cell(text):
    """Text for a markdown table cell."""
    return text.replace("|", "\\|")


def reclaim_note():
    """This machine's proactive reclaim, if any: it takes page cache that is not touched for a
    few seconds, so "second" rows may read some data again (for every tool)."""
    state = Path("/sys/kernel/mm/damon/admin/kdamonds/0/state")
    try:
        if state.read_text().strip() == "on":
            action = (state.parent / "contexts/0/schemes/0/action").read_text().strip()
            return f"DAMON proactive reclaim is on (action `{action}`)"
    except OSError:
        pass
    return "no proactive reclaim (DAMON off)"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def report(rows, n_files, size, rss, n_entries, versions):
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/run.py) from one run on this machine; every figure is the",
        f"median of {RUNS} runs with min–max, all tools measured side by side in the same run.",
        "\"first\" rows drop the page cache (`echo 3 > /proc/sys/vm/drop_caches`) and mount afresh",
        "(for the FUSE tools: unmount and mount again from their cache) before the first run;",
        "\"second\" is the run right after it. Native is the same tree extracted by",
        "`skopeo copy` + `umoci raw unpack` onto this ext4 disk. The last column is jkmount's",
        "figure over native's: for times lower is better, for rates (req/s, workloads/s) higher.",
        "",
        "## Machine and versions",
        "",
        f"- {platform.node()}: {os.cpu_count()} cores ({cpu_model()}), "
        f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024 // 1024} GiB, Linux {platform.release()}, "
        f"{reclaim_note()}",
    ]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += [
        f"- Large image: {n_files:,} files ({n_entries:,} entries, {size / 2**20:.0f} MiB) of npm "
        f"packages ({', '.join(NPM_PACKAGES)}), 5 gzip layers packed by `jkmount pack`, served by "
        "docker-registry on 127.0.0.1.",
        "",
        "## Results",
        "",
        "| row | " + " | ".join(COLUMNS) + " | jkmount / native |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for label, cells in rows:
        shown = []
        for c in COLUMNS:
            v = cells.get(c)
            shown.append(v.shown() if isinstance(v, Result) else (v or "—"))
        jkm, nat = median(cells, "jkmount"), median(cells, "native")
        shown.append(f"{jkm / nat:.2f}×" if jkm and nat else "—")
        lines.append(f"| {cell(label)} | " + " | ".join(shown) + " |")
    lines += ["", "## Targets", "", "| target | this run | |", "|---|---|---|"]
    for text, figure, ok in targets(rows, n_entries):
        lines.append(f"| {cell(text)} | {figure} | {'met' if ok else '**missed**'} |")
    notes = Path(__file__).parent / "notes.md"
    OUT.write_text("\n".join(lines) + "\n" + (("\n" + notes.read_text()) if notes.exists() else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
