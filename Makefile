# jkmount: build, demo, tests. `make test` runs every tier; `make demo` the main job end to end.
CARGO ?= cargo

PREFIX ?= /usr/local
DESTDIR ?=
# The static build (runs anywhere, and alone in a container image) is for the host's triple.
TARGET ?= $(shell rustc -vV | sed -n 's/^host: //p')
STATIC_BIN = target/$(TARGET)/release/jkmount
IMAGE_LAYOUT ?= target/jkmount-image
IMAGE_REF ?=

.PHONY: all build demo test test-deps bench lint test-unit test-property test-integration test-packaging test-mount fuzz-build release install deb image clean

all: build

build:
	$(CARGO) build

# Build an example module image (an OCI layout), mount it, run node against it, unmount.
demo: build
	./demo/run.sh

# Every tier, cheapest first, after installing what they need (as root; any other user is
# shown the install line). Mount tests need root (or fusermount3) and /dev/fuse.
test: test-deps
	$(MAKE) lint test-unit test-property test-integration test-packaging test-mount fuzz-build

# docker-registry, fuse3, umoci, skopeo, nginx, ... (scripts/test-deps.sh has the one list).
test-deps:
	scripts/test-deps.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features test-support -- -D warnings
	python3 -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' bench/*.py

# Unit tests need nothing but Rust (a plain `cargo test` runs these and the property test).
test-unit:
	$(CARGO) test --features test-support --lib --bins --examples

# Property: random layer stacks merged equal a naive path-map model; random changes through
# the writable core equal a plain directory, and its upper is their layer.
test-property:
	$(CARGO) test --test merge_model --test overlay_model

# Integration: the CLI against a real docker-registry on 127.0.0.1. The limits tests run one
# at a time: their peak-memory check sees every child of the test binary.
test-integration:
	$(CARGO) test --features test-support --test pull --test lying --test lifecycle --test registries --test transfers --test pack --test extract
	$(CARGO) test --features test-support --test limits -- --test-threads=1

# Packaging: make install, the Debian package, the systemd units and the Kubernetes manifests
# (validated against the Kubernetes schemas). `make image` is checked by a mount test.
test-packaging: release
	packaging/check.sh $(STATIC_BIN)

# Mount: real FUSE mounts read with find, cat, stat, node and GNU tar.
test-mount:
	$(CARGO) test --features test-support --test mount

# The cargo-fuzz targets compile with the stable toolchain, into the main target/ so they
# share its dependencies (fuzz/Cargo.toml has the same dev profile); running them needs nightly:
#   cd fuzz && cargo +nightly fuzz run layer_index
fuzz-build:
	$(CARGO) build --manifest-path fuzz/Cargo.toml --target-dir target

# jkmount against native disk, skopeo+umoci, podman, fuse-overlayfs and ratarmount, side by
# side in one run (root; installs the peers from Debian and PyPI); writes docs/benchmarks.md.
bench: release
	python3 bench/run.py

# A static, stripped jkmount.
release:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(TARGET)

# Binary, man pages, shell completions, systemd template unit under $(DESTDIR)$(PREFIX).
install: release
	packaging/install.sh $(STATIC_BIN) "$(DESTDIR)" "$(PREFIX)"

# target/debian/jkmount_VERSION-1_ARCH.deb (needs cargo-deb: cargo install cargo-deb).
deb: release
	rm -rf target/deb-root
	packaging/install.sh $(STATIC_BIN) target/deb-root /usr
	$(CARGO) deb --no-build --no-strip --target $(TARGET)

# A minimal OCI image of the static jkmount, made by jkmount pack: an OCI layout at
# $(IMAGE_LAYOUT), or pushed to $(IMAGE_REF) when that is set.
image: release
	packaging/container/build.sh $(STATIC_BIN) $(IMAGE_LAYOUT) $(IMAGE_REF)

clean:
	$(CARGO) clean
