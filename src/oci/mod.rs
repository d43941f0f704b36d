//! The OCI vocabulary, as data: image references, digests, platforms, and the manifest, index
//! and config documents. Parsing and checking only; nothing here touches the network or the
//! cache.

pub mod digest;
pub mod image;
pub mod platform;
pub mod reference;
