//! The pipelines the commands run, as library functions: [`pull`] an image from its source
//! into the cache, assemble what a mount serves from pulled images ([`mountable`]), and pin
//! references in a [`lockfile`].

pub mod lockfile;
pub mod mountable;
pub mod pull;
