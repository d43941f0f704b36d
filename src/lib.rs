//! jkmount: mount OCI images as read-only directories.
//!
//! The library is plain data in, data out: references ([`reference`]), image documents
//! ([`image`]), the content-addressed [`cache`], layer decoding ([`layer`]), the union
//! ([`merge`] into a [`tree`]), fetching ([`registry`], [`layout`], [`pull`]) and the filesystem core
//! ([`fs`]). Only `fs::fuse` knows about FUSE, and only `registry` is async.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod digest;
pub mod error;
pub mod extract;
#[cfg(any(test, feature = "test-support"))]
pub mod fixture;
pub mod gc;
pub mod image;
pub mod layer;
pub mod layout;
pub mod lockfile;
pub mod merge;
pub mod persist;
pub mod platform;
pub mod progress;
pub mod reference;
pub mod tree;

pub use error::{Error, Result};
pub mod fs;
pub mod mount;
pub mod mountable;
pub mod pack;
pub mod pull;
pub mod registry;
pub mod verify;
