//! The pipelines the commands run, as library functions: [`pull`] an image from its source
//! into the cache, assemble what a mount serves from pulled images ([`mountable`]), and pin
//! references in a [`lockfile`]; [`prepare`] does all of it for a mount or an extraction,
//! and [`serve`] hands the result to the mount. [`pack`] builds and pushes images.

pub mod commit;
pub mod index;
pub mod lazy;
pub mod lockfile;
pub mod mountable;
pub mod pack;
pub mod prepare;
pub mod pull;
pub mod serve;
