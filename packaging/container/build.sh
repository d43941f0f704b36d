#!/usr/bin/env bash
# make image: a minimal OCI image of a static jkmount, built by `jkmount pack` itself (no
# Docker): /usr/bin/jkmount, the CA bundle for registries over TLS, an empty cache directory
# and a mountpoint. Written as an OCI layout, or pushed when IMAGE_REF is set.
#   packaging/container/build.sh STATIC_BINARY LAYOUT_DIR [IMAGE_REF]
set -euo pipefail
bin=$1
layout=$2
ref=${3:-}
cd "$(dirname "$0")/../.."

if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "make image: $bin is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'" >&2
  exit 1
fi
certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || { echo "make image: $certs is missing: apt-get install ca-certificates" >&2; exit 1; }

version=$("$bin" --version | awk '{print $2}')
root=target/container-root
rm -rf "$root"
install -Dm755 "$bin" "$root/usr/bin/jkmount"
install -Dm644 "$certs" "$root/etc/ssl/certs/ca-certificates.crt"
install -d "$root/var/cache/jkmount" "$root/mnt/modules" "$root/tmp"

# The same sources give the same image: the layer's times come from the last commit.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 315532800)}
export SOURCE_DATE_EPOCH
if [ -n "$ref" ]; then
  output=(--tag "$ref")
else
  rm -rf "$layout"
  output=(--output "oci:$layout:$version")
fi
"$bin" --cache-dir target/container-cache pack "$root" --prefix / "${output[@]}" \
  --entrypoint /usr/bin/jkmount \
  --env JKMOUNT_CACHE_DIR=/var/cache/jkmount \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --env PATH=/usr/bin \
  --annotation org.opencontainers.image.title=jkmount \
  --annotation "org.opencontainers.image.version=$version" \
  --annotation "org.opencontainers.image.description=jkmount: mount OCI images as read-only directories"
