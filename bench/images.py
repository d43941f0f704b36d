"""What `make bench` measures on: the tools it installs, trees of real npm packages and
generated files, a docker-registry on 127.0.0.1, and images packed from them with `jkmount pack`."""

import os
import shutil
import subprocess
import sys

from common import JK, WORK, du, free_port, sh, wait_for_port


NPM_PACKAGES = [
    "typescript@5.6.3", "webpack@5.96.1", "@babel/core@7.26.0", "@babel/preset-env@7.26.0",
    "eslint@9.15.0", "jest@29.7.0", "rxjs@7.8.1", "lodash@4.17.21", "@mui/material@6.1.8",
    "react@18.3.1", "react-dom@18.3.1", "date-fns@4.1.0", "@fortawesome/free-solid-svg-icons@6.7.1",
    "core-js@3.39.0",
]


REQUIRED = ["typescript", "webpack", "@babel/core", "eslint", "jest"]


APT = ["podman", "fuse-overlayfs", "wrk", "umoci", "skopeo", "nginx-light", "docker-registry"]


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
