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
import shutil
import signal
import subprocess
from pathlib import Path

import link
import writes
from common import (JK, OUT, ROOT, RUNS, Result, WORK, attempt, count_files, du, free_port, log,
                    out, samples, sh, timed, version, wait_for_port)
from images import (NPM_PACKAGES, Registry, big_files, generated_tree, install, npm_tree,
                    pack_layers, split_into_layers, static_site)
from lazy import completed_rows, completed_targets, lazy_rows, lazy_targets, workload_files
from tools import (FuseOverlayfs, Jkmount, Native, PROBE, Passthrough, Podman, Ratarmount,
                   SkopeoUmoci, find_workload, first_and_second, index_for_lazy, median,
                   node_command, node_workload, peak_rss_mib, smaps, split_passthrough,
                   tar_workload, zstd_chunked_copy)


# ---------------------------------------------------------------- measurements


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
