//! Where images come from: a registry over the OCI distribution API ([`registry`], the only
//! async code in the library) or an OCI image layout directory on disk ([`layout`]). Nothing a
//! source returns is trusted; bytes are verified where they enter the cache. [`progress`] is
//! what a source reports while it transfers.

pub mod layout;
pub mod progress;
pub mod registry;
