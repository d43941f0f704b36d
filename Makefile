# jkmount: build, demo, tests. `make test` runs every tier; `make demo` the main job end to end.
CARGO ?= cargo

.PHONY: all build demo test lint test-unit test-property test-integration test-mount fuzz-build clean

all: build

build:
	$(CARGO) build

# Build an example module image (an OCI layout), mount it, run node against it, unmount.
demo: build
	./demo/run.sh

# Every tier, cheapest first. Mount tests need root (or fusermount3) and /dev/fuse.
test: lint test-unit test-property test-integration test-mount fuzz-build

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test-unit:
	$(CARGO) test --lib --bins --examples

# Property: random layer stacks merged equal a naive path-map model.
test-property:
	$(CARGO) test --test merge_model

# Integration: the CLI against a real docker-registry on 127.0.0.1.
test-integration:
	$(CARGO) test --test pull --test limits --test lying --test lifecycle --test registries --test pack --test extract

# Mount: real FUSE mounts read with find, cat, stat, node and GNU tar.
test-mount:
	$(CARGO) test --test mount

# The cargo-fuzz targets compile with the stable toolchain; running them needs nightly:
#   cd fuzz && cargo +nightly fuzz run layer_index
fuzz-build:
	$(CARGO) build --manifest-path fuzz/Cargo.toml

clean:
	$(CARGO) clean
