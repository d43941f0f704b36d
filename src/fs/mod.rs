//! The filesystem: [`core`] answers every request from the immutable tree with plain file
//! reads and no FUSE types; [`fuse`] is the thin `fuser` skin that translates, with
//! [`passthrough`] the state it keeps when the kernel reads big files itself, and [`waiting`]
//! the threads that serve reads which may wait on the network; [`prefill`] hands small files'
//! bytes to the kernel as they are looked up; [`record`] writes the files a run reads
//! (`--record-reads`).

pub mod content;
pub mod core;
pub mod fuse;
pub mod overlay;
pub mod passthrough;
pub mod prefill;
pub mod record;
pub mod served;
pub mod stats;
pub mod waiting;

pub use self::core::{Attr, FileKind, FsCore, FsError};
