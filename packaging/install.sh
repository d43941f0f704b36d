#!/usr/bin/env bash
# Installs jkmount under DESTDIR/PREFIX: the binary, man pages and shell completions
# generated from it, and the systemd template unit (pointing at PREFIX/bin/jkmount). Used by
# `make install` and `make deb`.
#   packaging/install.sh BINARY DESTDIR PREFIX
set -euo pipefail
bin=$1
destdir=$2
prefix=$3
root=$destdir$prefix
here=$(cd "$(dirname "$0")" && pwd)

install -Dm755 "$bin" "$root/bin/jkmount"
installed="$root/bin/jkmount"

man="$root/share/man/man1"
mkdir -p "$man"
"$installed" man "$man"
gzip -9nf "$man"/jkmount*.1

install -d "$root/share/bash-completion/completions" "$root/share/zsh/vendor-completions" \
  "$root/share/fish/vendor_completions.d"
"$installed" completions bash >"$root/share/bash-completion/completions/jkmount"
"$installed" completions zsh >"$root/share/zsh/vendor-completions/_jkmount"
"$installed" completions fish >"$root/share/fish/vendor_completions.d/jkmount.fish"

# The template service is inert until an operator enables an instance of it.
install -d "$root/lib/systemd/system"
sed "s|/usr/bin/jkmount|$prefix/bin/jkmount|g" "$here/systemd/jkmount@.service" \
  >"$root/lib/systemd/system/jkmount@.service"
chmod 644 "$root/lib/systemd/system/jkmount@.service"
install -d "$root/share/doc/jkmount/examples"
install -m644 "$here/systemd/srv-libs.mount" "$here/kubernetes/sidecar.yaml" \
  "$here/kubernetes/extract-init.yaml" "$root/share/doc/jkmount/examples/"
# The CSI driver's manifests, as csi-*.yaml beside the others.
for f in "$here"/kubernetes/csi/*.yaml; do
  install -m644 "$f" "$root/share/doc/jkmount/examples/csi-$(basename "$f")"
done
