"""The rows of `make bench` that write: a project whose `node_modules` is the large image,
writable, on native disk (a copy of the tree), through `jkmount --writable` and through
fuse-overlayfs with an upper and work directory over the same layers. In each run every tool
starts from a fresh upper (a fresh copy for native) and a dropped page cache, then, timed one
by one in the same tree: untar of 5,000 small files into `node_modules/.cache`, `npm install` of a
local package tarball (offline), and a webpack build with its filesystem cache in
`node_modules/.cache/webpack` run twice (the second reads the cache the first wrote)."""

import json
import shutil
import subprocess

from common import RUNS, WORK, JK, Result, attempt, drop_caches, log, sh, timed, unmount

UNTAR = "writable: untar of 5,000 small files into node_modules/.cache"
NPM = "writable: npm install of a local package tarball"
WEBPACK_EMPTY = "writable: webpack build, its filesystem cache empty"
WEBPACK_CACHED = "writable: webpack build again, from its filesystem cache"
ROWS = [UNTAR, NPM, WEBPACK_EMPTY, WEBPACK_CACHED]

# What the bundle pulls in: packages of the image, CommonJS and ES modules both.
ENTRY = """\
const _ = require('lodash');
const { of } = require('rxjs');
const { format } = require('date-fns');
const React = require('react');
const ReactDOM = require('react-dom');
of(1).subscribe(() => console.log(_.chunk([1, 2, 3], 2), format(0, 'yyyy'), React.version,
  typeof ReactDOM.createPortal));
"""

BUILD = """\
const path = require('path');
const webpack = require('webpack');
const compiler = webpack({
  mode: 'development', devtool: false, context: __dirname, entry: './src/index.js',
  output: { path: path.join(__dirname, 'dist') }, cache: { type: 'filesystem' },
  infrastructureLogging: { level: 'error' },
});
compiler.run((err, stats) => {
  if (err || stats.hasErrors()) {
    console.error(err || stats.toString('errors-only'));
    process.exit(1);
  }
  compiler.close((closed) => { if (closed) { console.error(closed); process.exit(1); } });
});
"""


def inputs(npm_dir, small_tree):
    """The tarball of 5,000 files and the local package's tarball, made once."""
    tar = WORK / "writes" / "5k.tar"
    package = WORK / "writes" / "local" / "bench-local-1.0.0.tgz"
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        sh("tar", "-cf", tar, "-C", small_tree.parent, small_tree.name)
    if not package.exists():
        source = package.parent / "src"
        source.mkdir(parents=True, exist_ok=True)
        (source / "package.json").write_text(json.dumps(
            {"name": "bench-local", "version": "1.0.0", "main": "index.js"}) + "\n")
        (source / "index.js").write_text("module.exports = 'local';\n")
        sh("npm", "pack", "--silent", "--pack-destination", package.parent, source,
           stdout=subprocess.DEVNULL)
    return tar, package


class Project:
    """A project directory whose `node_modules` is a bind mount of a tool's tree."""

    def __init__(self, npm_dir, where):
        self.dir = where / "project"
        self.npm_dir = npm_dir

    def make(self, modules):
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "src").mkdir(parents=True)
        (self.dir / "node_modules").mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copy(self.npm_dir / name, self.dir / name)
        (self.dir / "src" / "index.js").write_text(ENTRY)
        (self.dir / "build.js").write_text(BUILD)
        sh("mount", "--bind", modules, self.dir / "node_modules")

    def take_down(self):
        unmount(self.dir / "node_modules")


class NativeTree:
    name = "native"

    def __init__(self, source):
        self.source, self.dir = source, WORK / "writes" / "native"

    def fresh(self):
        shutil.rmtree(self.dir / "tree", ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        sh("cp", "-a", self.source, self.dir / "tree")
        return self.dir / "tree" / "jk" / "modules"

    def stop(self):
        shutil.rmtree(self.dir / "tree", ignore_errors=True)


class WritableMount:
    """A tool's writable mount of the large image at `WORK/writes/NAME/mnt`; `fresh` mounts it
    anew and returns its `node_modules`."""

    name = None

    def __init__(self, tool):
        self.tool, self.dir = tool, WORK / "writes" / self.name
        self.mnt = self.dir / "mnt"

    def fresh(self):
        unmount(self.mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self._mount()
        return self.mnt / "jk" / "modules"

    def stop(self):
        unmount(self.mnt)


class JkmountWritable(WritableMount):
    """`jkmount --writable` from the cache the read-only rows filled: a fresh temporary upper."""

    name = "jkmount"

    def _mount(self):
        sh(JK, "-q", "--cache-dir", self.tool.cache, "--writable", self.tool.ref, self.mnt)


class FuseOverlayfsWritable(WritableMount):
    """fuse-overlayfs over the layers its read-only rows extracted, with a fresh upper."""

    name = "fuse-overlayfs"

    def _mount(self):
        for d in ("upper", "work"):
            shutil.rmtree(self.dir / d, ignore_errors=True)
            (self.dir / d).mkdir(parents=True)
        options = (f"lowerdir={self.tool.lowerdir()},upperdir={self.dir / 'upper'},"
                   f"workdir={self.dir / 'work'}")
        sh("fuse-overlayfs", "-o", options, self.mnt)


def one_run(tool, tar, package, npm_dir):
    """Readies `tool` afresh, then times each step in its tree: {row: seconds}."""
    project = Project(npm_dir, WORK / "writes" / tool.name)
    project.make(tool.fresh())
    try:
        drop_caches()
        cwd = project.dir
        modules = cwd / "node_modules"
        npm = ["npm", "install", "--offline", "--no-audit", "--no-fund", "--ignore-scripts"]
        quiet = {"cwd": cwd, "stdout": subprocess.DEVNULL}
        (modules / ".cache").mkdir(exist_ok=True)
        took = {
            # Where npm leaves it alone (it would prune a directory that is no package).
            UNTAR: timed(lambda: sh("tar", "-xf", tar, "-C", modules / ".cache")),
            NPM: timed(lambda: sh(*npm, package, **quiet)),
            WEBPACK_EMPTY: timed(lambda: sh("node", "build.js", **quiet)),
            WEBPACK_CACHED: timed(lambda: sh("node", "build.js", **quiet)),
        }
        checks = [modules / ".cache" / "src-5k" / "d049" / "f0099.js", modules / "bench-local" / "index.js",
                  modules / ".cache" / "webpack", cwd / "dist" / "main.js"]
        missing = [str(p) for p in checks if not p.exists()]
        if missing:
            raise RuntimeError(f"{tool.name}: the writes left no {', '.join(missing)}")
        return took
    finally:
        project.take_down()
        tool.stop()


def measure(jk, fo, native_source, npm_dir, small_tree):
    """The write rows: [(label, {tool: Result or failure})]."""
    tar, package = inputs(npm_dir, small_tree)
    tools = [NativeTree(native_source), JkmountWritable(jk), FuseOverlayfsWritable(fo)]
    got = {t.name: {row: [] for row in ROWS} for t in tools}
    failed = {}
    for _ in range(RUNS):  # interleaved, as the other rows
        for tool in tools:
            if tool.name in failed:
                continue
            took = attempt(f"{tool.name} writes", lambda t=tool: one_run(t, tar, package, npm_dir))
            if isinstance(took, str):
                failed[tool.name] = took
                continue
            for row, seconds in took.items():
                got[tool.name][row].append(seconds)
    log("writes measured")
    return [(row, {name: failed.get(name) or Result(rows[row]) for name, rows in got.items()})
            for row in ROWS]


def targets(by, ratio, add):
    """Each write costs no more through jkmount than through fuse-overlayfs."""
    for row in ROWS:
        add(f"{row.split(': ', 1)[1]}: ≤ 1.0× fuse-overlayfs", ratio(row, "jkmount", "fuse-overlayfs"),
            1.0)

