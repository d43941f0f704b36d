#!/usr/bin/env bash
# make test-packaging: what `make install` and `make deb` lay out, the systemd units (checked
# by systemd-analyze) and the Kubernetes manifests (validated against the Kubernetes API
# schemas by kubernetes-validate, strict: unknown fields are errors).
#   packaging/check.sh STATIC_BINARY
set -euo pipefail
bin=$1
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "packaging check: $*" >&2; exit 1; }
# `cmd | grep -q` under pipefail fails when grep stops reading early (SIGPIPE): match on the
# whole output instead.
has() { grep -q -- "$2" <<<"$1"; }

echo "== make install DESTDIR=$work/root PREFIX=/usr/local"
make -s install DESTDIR="$work/root" PREFIX=/usr/local >/dev/null
r=$work/root/usr/local
for f in bin/jkmount share/man/man1/jkmount.1.gz share/man/man1/jkmount-extract.1.gz \
  share/bash-completion/completions/jkmount share/zsh/vendor-completions/_jkmount \
  share/fish/vendor_completions.d/jkmount.fish lib/systemd/system/jkmount@.service; do
  [ -s "$r/$f" ] || fail "make install did not write $f"
done
has "$("$r/bin/jkmount" --version)" '^jkmount ' || fail "the installed jkmount does not run"
page=$(zcat "$r/share/man/man1/jkmount.1.gz")
has "$page" '^\.TH jkmount 1' || fail "jkmount.1 is not a man page"
has "$page" 'fuse.jkmount' || fail "jkmount.1 lacks the -o options"
bash -n "$r/share/bash-completion/completions/jkmount" || fail "bash completion does not parse"
grep -q 'extract' "$r/share/bash-completion/completions/jkmount" || fail "bash completion lacks extract"
grep -q "ExecStart=/usr/local/bin/jkmount -f" "$r/lib/systemd/system/jkmount@.service" \
  || fail "the unit does not point at the installed binary"

echo "== systemd-analyze verify"
units=$work/units
mkdir -p "$units"
# The units name the packaged /usr/bin/jkmount; point them at the one just installed.
for unit in packaging/systemd/*; do
  sed "s|/usr/bin/jkmount|$r/bin/jkmount|g" "$unit" >"$units/$(basename "$unit")"
done
ln -s 'jkmount@.service' "$units/jkmount@srv-libs.service"
# Unknown keys are only warnings to systemd-analyze: any output at all fails the check.
said=$(cd "$units" && systemd-analyze verify --man=no ./jkmount@srv-libs.service ./srv-libs.mount 2>&1) \
  || fail "systemd-analyze verify: $said"
[ -z "$said" ] || fail "systemd-analyze verify: $said"

echo "== kubernetes-validate --strict"
python3 -m kubernetes_validate --strict --kubernetes-version 1.33.0 packaging/kubernetes/*.yaml \
  packaging/kubernetes/csi/*.yaml

echo "== make deb"
make -s deb >/dev/null
deb=$(ls -t target/debian/jkmount_*.deb | head -1)
has "$(dpkg-deb -I "$deb")" '^ Depends: fuse3$' || fail "$deb does not depend on fuse3"
dpkg-deb -c "$deb" >"$work/contents"
for f in ./usr/bin/jkmount ./usr/share/man/man1/jkmount.1.gz ./usr/share/man/man1/jkmount-pull.1.gz \
  ./usr/share/bash-completion/completions/jkmount ./usr/share/zsh/vendor-completions/_jkmount \
  ./usr/share/fish/vendor_completions.d/jkmount.fish ./usr/lib/systemd/system/jkmount@.service \
  ./usr/share/doc/jkmount/examples/sidecar.yaml ./usr/share/doc/jkmount/examples/csi-plugin.yaml; do
  grep -q " $f\$" "$work/contents" || fail "$deb lacks $f"
done
dpkg-deb -x "$deb" "$work/deb"
has "$("$work/deb/usr/bin/jkmount" --version)" '^jkmount ' || fail "the packaged jkmount does not run"
grep -q "ExecStart=/usr/bin/jkmount -f" "$work/deb/usr/lib/systemd/system/jkmount@.service" \
  || fail "the packaged unit does not point at /usr/bin/jkmount"
echo "packaging check: ok ($deb)"
