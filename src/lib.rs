//! jkmount: mount OCI images as read-only directories.
//!
//! The library is plain data in, data out. An image travels through one folder per step:
//!
//! ```text
//! reference ─▶ source ─▶ cache ─▶ layer index ─▶ merge ─▶ tree ─▶ fs core ─▶ fuser ─▶ mount
//!   oci/       source/    cache/    layer/        tree/    tree/    fs/        fs/fuse  mount/
//!
//! directory ─▶ pack/ (layer tar + documents) ─▶ source/registry (push) or an OCI layout
//! ```
//!
//! - [`oci`]: references, digests, platforms, manifest/index/config documents.
//! - [`source`]: where images come from — a registry (the only async code) or a layout dir.
//! - [`cache`]: the content-addressed store and its whole on-disk format, gc and verify.
//! - [`layer`]: a layer blob decoded into its content file and an index of its entries.
//! - [`tree`]: the union of layers, whiteouts applied, as an immutable arena.
//! - [`fs`]: the filesystem core (no FUSE types) and the thin `fuser` skin; `fs::overlay` is
//!   the writable core over the tree and an [`upper`] (the changes, as an OCI layer's).
//! - [`mount`]: putting a filesystem at a mountpoint and taking it away.
//! - [`app`]: the pipelines the commands run (pull, prepare a mount, lock).
//! - [`extract`] writes a tree to a directory; [`pack`] builds images from directories.
//! - [`handle`]: directory handles, for everything done where another user may write.
//! - [`csi`]: the Kubernetes CSI node plugin; [`keeper`] holds its mounts in a process of
//!   their own.
//!
//! Test fixtures ([`fixture`]) are compiled only with the `test-support` feature.
// Denied, not forbidden, for two exceptions, each allowed on one small function with its
// reasoning: mapping a tree file (`tree::file::map_immutable`) and forking the background
// server while the process has one thread (`mount::daemon::fork_single_threaded`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod cache;
pub mod csi;
pub mod error;
pub mod extract;
#[cfg(any(test, feature = "test-support"))]
pub mod fixture;
pub mod fs;
pub mod handle;
pub mod keeper;
pub mod layer;
pub mod lazy;
pub mod mount;
pub mod oci;
pub mod pack;
pub mod source;
pub mod tree;
pub mod upper;

pub use error::{Error, Result};
