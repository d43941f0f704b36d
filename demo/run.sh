#!/usr/bin/env bash
# make demo: build an example module image, mount it, run node against it, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/demo
jkmount=target/debug/jkmount
rm -rf "$work" && mkdir -p "$work/mnt"
cargo run -q --features test-support --example demo_image -- "$work/layout"
"$jkmount" --cache-dir "$work/cache" "oci:$work/layout:demo" "$work/mnt"
trap '"$jkmount" unmount "$work/mnt"' EXIT
echo "mounted at $work/mnt:"
find "$work/mnt" | sort | sed 's/^/  /'
echo "node says:"
NODE_PATH="$work/mnt/jk/modules" node demo/app.js
