//! The OCI vocabulary, as data: image references, digests, platforms, the manifest, index
//! and config documents, and the image layout format (written here, read by
//! `source::layout`). Nothing here touches the network or the cache.

pub mod digest;
pub mod document;
pub mod image;
pub mod layout;
pub mod platform;
pub mod reference;
