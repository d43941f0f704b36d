"""What every part of `make bench` shares: paths, running commands, timing, mounts, and the
figures of a row (`Result`)."""

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "bench"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "docs" / "benchmarks.md"))
TRIPLE = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
TRIPLE = next(l.split(": ")[1] for l in TRIPLE.splitlines() if l.startswith("host: "))
JK = ROOT / "target" / TRIPLE / "release" / "jkmount"


def sh(*cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def out(*cmd, **kw):
    return sh(*cmd, capture_output=True, text=True, **kw).stdout


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, what, tries=200):
    """Returns once something accepts connections on 127.0.0.1:`port` (at most ~10 s)."""
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")


def version(cmd, pick=None):
    try:
        said = sh(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                  check=False).stdout
        lines = said.strip().splitlines()
        return next((l for l in lines if pick and pick in l), lines[0])
    except Exception as e:  # noqa: BLE001 - shown in the report as is
        return f"unavailable ({e})"


def is_mounted(path):
    path = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(path):
    for cmd in (["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        sh(*cmd, check=False, stderr=subprocess.DEVNULL)


def du(path):
    return int(out("du", "-sb", path).split()[0])


def count_files(path):
    return int(out("sh", "-c", f"find '{path}' -type f | wc -l").strip())


class Result:
    """Samples of one row for one tool."""

    def __init__(self, samples, unit="s"):
        self.samples, self.unit = samples, unit

    @property
    def median(self):
        return statistics.median(self.samples)

    def shown(self):
        if self.unit == "s":
            f = lambda v: f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"  # noqa: E731
        elif self.unit == "MiB":
            f = lambda v: f"{v:.1f} MiB"  # noqa: E731
        elif self.unit == "workloads/s":
            f = lambda v: f"{v:.2f}/s"  # noqa: E731
        elif self.unit == "%":
            f = lambda v: f"{v:.2f} %"  # noqa: E731
        else:
            f = lambda v: f"{v:,.0f} {self.unit}"  # noqa: E731
        if len(self.samples) == 1:
            return f(self.median)
        return f"{f(self.median)} ({f(min(self.samples))}–{f(max(self.samples))})"


def samples(fn, runs=RUNS):
    return Result([fn() for _ in range(runs)])


def attempt(what, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a peer that fails here is reported, not fatal
        log(f"{what} failed: {e}")
        return f"failed: {str(e).splitlines()[0][:80]}"
