//! Serving a layer before it is downloaded: [`index`] is jkmount's lazy index of a gzip layer
//! (entries, deflate access points or gzip member starts, a digest per compressed chunk and
//! per uncompressed block),
//! [`layer`] the layer served from it, each span fetched by `Range` and checked before use,
//! each file's tar headers ([`headers`]) checked before its data is served.
//! [`progress`] is how much of it is local, as `jkmount status` shows it. Finding indexes and
//! completing layers in the background is `app::lazy`'s.

mod headers;
pub mod index;
pub mod layer;
pub mod progress;
pub mod reads;

pub use index::LazyIndex;
pub use layer::{LazyLayer, Spans};
