//! Serving a layer before it is downloaded ([`LazyLayer`]): [`index`] is jkmount's lazy index of a gzip layer
//! (entries, deflate access points or gzip member starts, a digest per compressed chunk and
//! per uncompressed block),
//! [`layer`] the layer served from it, each span fetched by `Range` and checked before use,
//! each file's tar headers ([`headers`]) checked before its data is served.
//! [`toc`] serves an eStargz layer from its own table of contents instead, when no index of
//! jkmount's is at hand. [`claims`] keeps two reads from fetching one chunk twice. [`progress`] is how much of it is local, as `jkmount status` shows it; [`served`] holds its
//! sparse files and hands reads over to the cache's content once the layer is complete. Finding indexes and
//! completing layers in the background is `app::lazy`'s.

mod claims;
mod headers;
pub mod index;
pub mod layer;
pub mod progress;
pub mod reads;
pub mod served;
pub mod toc;

pub use index::LazyIndex;
pub use layer::{IndexedLayer, LazyLayer, Spans};
pub use toc::{TocIndex, TocLayer};
