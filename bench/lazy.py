"""The lazy-mount rows of `make bench`: first results over the shaped link from an empty cache,
lazy against eager and the peers, the media site, reads through lazy mounts once complete, and
the lazy targets."""

import json
import shutil

import link
from common import RUNS, Result, WORK, attempt, log, sh, unmount
from images import REQUIRED, media_site, pack_layers
from tools import (EagerChunked, EagerEstargz, EagerTable, Jkmount, Lazy, LazyChunked,
                   LazyCompleted, LazyEstargz, LazyOnRead, LazyOnReadEstargz, LazyPrefetch,
                   LazyTable, LazyTableCompleted, Podman, SkopeoUmoci, find_workload,
                   first_and_second, index_for_lazy, layer_bytes_of, median, node_workload,
                   page_workload, tar_workload)


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
