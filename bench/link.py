"""The constrained link of `make bench`: the registry reached through a network namespace that the
bench makes and removes itself. Its loopback is shaped with `tc tbf` (this kernel has no netem),
and a small delaying proxy on that loopback adds the round-trip time. Cold mounts of jkmount,
skopeo+umoci and podman go over it, beside the time to fetch the image's compressed bytes alone.

Every payload byte crosses the namespace's loopback twice (registry → proxy, proxy → client),
so the loopback is shaped at twice the link's rate; the "bytes alone" row measures what the
link really carries. Run as `link.py proxy LISTEN UPSTREAM DELAY_MS` it is that proxy.
"""

import asyncio
import ctypes
import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager

from common import WORK, Result, free_port, sh, timed, wait_for_port

CLONE_NEWNET = 0x40000000


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class Link:
    """A namespace whose loopback carries `rate_mbit` with `rtt_ms` of round trip, and in it a
    docker-registry over `storage` behind the delaying proxy. Use as a context manager: inside
    it this process (and what it starts) is in the namespace; `addr` is the proxy."""

    def __init__(self, storage, rate_mbit=100, rtt_ms=20):
        self.storage, self.rate, self.rtt = storage, rate_mbit, rtt_ms
        self.ns = f"jkbench{os.getpid()}"
        self.procs = []

    @contextmanager
    def inside(self):
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        sh("ip", "netns", "add", self.ns)
        try:
            there = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            setns(there)
            os.close(there)
            try:
                self._start()
                yield self
            finally:
                for proc in self.procs:
                    proc.terminate()
                    proc.wait()
                setns(home)
        finally:
            os.close(home)
            sh("ip", "netns", "del", self.ns, check=False)

    def _start(self):
        sh("ip", "link", "set", "lo", "up")
        sh("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{2 * self.rate}mbit",
           "burst", "256kb", "limit", "8mb")
        registry_port, proxy_port = free_port(), free_port()
        config = WORK / "link-registry.yml"
        config.write_text(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
            f"{self.storage}\nhttp:\n  addr: 127.0.0.1:{registry_port}\n")
        self.procs.append(subprocess.Popen(["docker-registry", "serve", str(config)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(registry_port, "docker-registry in the namespace")
        self.procs.append(subprocess.Popen([sys.executable, __file__, "proxy", str(proxy_port),
                                            str(registry_port), str(self.rtt / 2)]))
        wait_for_port(proxy_port, "the delaying proxy")
        self.addr = f"127.0.0.1:{proxy_port}"

    def fetch_bytes(self, repo, tag):
        """Fetches the image's manifest, config and layer blobs one after another, as bytes and
        nothing more: (seconds, compressed bytes)."""
        def get(path, accept=None):
            request = urllib.request.Request(f"http://{self.addr}/v2/{repo}/{path}")
            if accept:
                request.add_header("Accept", accept)
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.read()
        got = []

        def run():
            manifest = json.loads(get(f"manifests/{tag}",
                                      "application/vnd.oci.image.manifest.v1+json"))
            size = 0
            for blob in [manifest["config"], *manifest["layers"]]:
                size += len(get(f"blobs/{blob['digest']}"))
            got.append(size)
        return timed(run), got[-1]


def synced(cold):
    """A cold run after what earlier runs wrote has reached the disk: writeback left over from
    the last unpack (tens of thousands of files) otherwise slows the next one by seconds."""
    os.sync()
    return cold()


def rows(link, large, tools_for, probe, runs):
    """The link's rows: the bytes alone, then each tool's cold mount over it."""
    repo, tag = large.split("/", 1)[1].rsplit(":", 1)
    label = f"{link.rate} Mbit/s, {link.rtt} ms RTT"
    alone = [link.fetch_bytes(repo, tag) for _ in range(runs)]
    size = alone[0][1]
    out = [(f"link {label}: the image's {size / 2**20:.0f} MiB of compressed bytes alone",
            {"jkmount": Result([t for t, _ in alone])})]
    cells = {}
    for tool in tools_for(f"{link.addr}/{repo}:{tag}"):
        cells[tool.name] = Result([synced(lambda: tool.cold(probe)) for _ in range(runs)])
        tool.stop()
    out.append((f"link {label}: cold mount (empty cache → file readable)", cells))
    return out


def link_bytes():
    """Bytes received on this namespace's loopback so far (/proc/self/net follows the
    process's namespace, sysfs does not). Each payload byte crosses it twice."""
    for line in open("/proc/self/net/dev"):
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


FIRST_REQUIRE = "first node require of 5 packages"


def first_result_rows(link, large, tools_for, workload_for, runs, what=FIRST_REQUIRE):
    """Time from nothing (empty cache) to the first result of `workload_for(root)` (`what`)
    through each tool, and the compressed bytes that had crossed the link by then (half the
    loopback's count: registry → proxy → client)."""
    repo, tag = large.split("/", 1)[1].rsplit(":", 1)
    label = f"{link.rate} Mbit/s, {link.rtt} ms RTT"
    out = []
    for tool in tools_for(f"{link.addr}/{repo}:{tag}"):
        took, moved = [], []
        for _ in range(runs):
            os.sync()
            before = link_bytes()
            took.append(tool.cold_then(workload_for))
            moved.append((link_bytes() - before) / 2 / 2**20)
            tool.stop()
        out.append((first_result_row(label, tool.name, what), {"jkmount": Result(took)}))
        by = "that first result" if what == FIRST_REQUIRE else f"the end of {what}"
        out.append((f"link {label}: MiB over the link by {by} ({tool.name})",
                     {"jkmount": Result(moved, unit="MiB")}))
    return out


def first_result_row(label, tool, what=FIRST_REQUIRE):
    return f"link {label}: empty cache → {what} ({tool})"


# ---------------------------------------------------------------- the proxy


async def forward(reader, writer, delay):
    """Copies reader to writer, each chunk sent `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def send():
        while True:
            when, data = await queue.get()
            pause = when - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((loop.time() + delay, None))
    try:
        await sender
    except ConnectionError:
        pass


async def proxy(listen, upstream, delay):
    async def serve(client_reader, client_writer):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(forward(client_reader, writer, delay),
                             forward(reader, client_writer, delay))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["proxy"]:
    listen, upstream, delay_ms = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    asyncio.run(proxy(listen, upstream, delay_ms / 1000))
