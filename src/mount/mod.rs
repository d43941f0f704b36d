//! Putting a filesystem at a mountpoint and taking it away: checks that say what is wrong
//! before anything is mounted, the mount itself (type `fuse.jkmount`, `ro,nosuid,nodev`,
//! source = the image references), serving until unmounted or signalled, and `unmount`.
//! As root the mount is made with mount(2) directly; otherwise through `fusermount3`.
//! [`mountinfo`] reads what is mounted, [`preflight`] checks, [`session`] mounts and serves,
//! [`unmount`] takes mounts away, [`daemon`] runs the server in the background, [`host`]
//! lets one server serve many mounts of one tree. The
//! error type, [`MountError`], is shared by all of them.

mod attach;
pub mod control;
pub mod daemon;
pub mod host;
pub mod mountinfo;
pub mod preflight;
pub mod session;
pub mod unmount;

use attach::attach;
pub use mountinfo::{MountInfo, mount_at, parse_mountinfo};
use preflight::canonical;
pub use preflight::{Checks, Mountpoint, permits_allow_other, preflight};
pub use session::{MountRequest, serve};
pub use unmount::{Status, is_stale, status, unmount};
use unmount::{detach, lazy_unmount};

use std::io;
use std::path::PathBuf;

/// The filesystem type our mounts show in `/proc/mounts`.
pub const FS_TYPE: &str = "fuse.jkmount";
const SUBTYPE: &str = "jkmount";
const DEV_FUSE: &str = "/dev/fuse";
const FUSERMOUNT: &str = "fusermount3";
/// Where `fusermount3` reads whether users may use `allow_other`.
const FUSE_CONF: &str = "/etc/fuse.conf";
/// The file-type bits of `st_mode`, which the kernel wants as `rootmode`.
const S_IFMT: u32 = 0o170000;

/// What can stop a mount or unmount, each naming the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint does not exist.
    #[error("mountpoint {} does not exist; create it with mkdir -p", .0.display())]
    Missing(PathBuf),
    /// The mountpoint is not a directory.
    #[error("mountpoint {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The mountpoint has entries, which the mount would hide.
    #[error(
        "mountpoint {} is not empty (it holds {entry:?}); the mount would hide what is there: empty it, or mount over it with -o nonempty",
        path.display()
    )]
    NotEmpty {
        /// The mountpoint.
        path: PathBuf,
        /// One of its entries.
        entry: String,
    },
    /// Another user may rename entries of the mountpoint's parent, so could swap it.
    #[error(
        "the parent of mountpoint {} may be changed by {who} (it is writable and not sticky), who could swap the mountpoint during the mount; mount somewhere only you (or root) may change, or pass -o allow_shared_parent",
        path.display()
    )]
    SharedParent {
        /// The mountpoint.
        path: PathBuf,
        /// Who else may write its parent.
        who: String,
    },
    /// The mountpoint is a symlink where another user may repoint it.
    #[error(
        "mountpoint {} is a symlink in a directory {who} may change, so it could point anywhere by the time of the mount; mount on the directory it points to",
        path.display()
    )]
    LinkInSharedParent {
        /// The mountpoint as given.
        path: PathBuf,
        /// Who else may write its directory.
        who: String,
    },
    /// The mountpoint was moved away or swapped after it was checked.
    #[error(
        "mountpoint {} was replaced by something else while jkmount used it; nothing is mounted there: check who may write its parent, and mount again",
        .0.display()
    )]
    Replaced(PathBuf),
    /// Something is already mounted there.
    #[error("{} is already a mount point ({fstype} from {origin}); unmount it first", path.display())]
    AlreadyMounted {
        /// The mountpoint.
        path: PathBuf,
        /// Its filesystem type.
        fstype: String,
        /// Its source.
        origin: String,
    },
    /// No FUSE device.
    #[error(
        "{DEV_FUSE} is missing: load the fuse module (modprobe fuse), or give the container the device (--device /dev/fuse)"
    )]
    NoFuseDevice,
    /// `allow_other` asked by a user that `/etc/fuse.conf` does not let.
    #[error(
        "allow_other is not permitted for non-root mounts here: add a line user_allow_other to {FUSE_CONF} (as root), or mount without allow_other"
    )]
    AllowOtherNotPermitted,
    /// An ordinary user may not open the FUSE device, so `fusermount3` cannot either.
    #[error(
        "{DEV_FUSE} is not open to this user (fusermount3 opens it as the user): make it mode 0666 as distributions do (chmod 0666 {DEV_FUSE}), or mount as root"
    )]
    NoFuseAccess,
    /// Non-root without the setuid helper.
    #[error(
        "{FUSERMOUNT} is not installed, and it is needed to mount as a non-root user: install the fuse3 package"
    )]
    NoFusermount,
    /// The kernel or helper refused the mount.
    #[error("mounting at {} failed: {cause}", path.display())]
    MountFailed {
        /// The mountpoint.
        path: PathBuf,
        /// What the system said (in the message, so not also a `source`).
        cause: io::Error,
    },
    /// `commit` of a mount that takes no writes.
    #[error(
        "{} is a read-only jkmount mount, so there is nothing to commit: mount it with --writable or --upper DIR",
        .0.display()
    )]
    NotWritable(PathBuf),
    /// A live writable mount did not hold its writes for a commit.
    #[error("the writable mount at {} could not hold its writes for the commit: {detail}", path.display())]
    HoldFailed {
        /// The mountpoint.
        path: PathBuf,
        /// What went wrong and what to do.
        detail: String,
    },
    /// `unmount` on a path that is not a jkmount mount.
    #[error("{} is not a jkmount mount ({what}); nothing was unmounted", path.display())]
    NotOurs {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// The unmount itself failed.
    #[error("unmounting {} failed: {cause}{hint}", path.display())]
    UnmountFailed {
        /// The mountpoint.
        path: PathBuf,
        /// What the system said (in the message, so not also a `source`).
        cause: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.jkmount 127.0.0.1:5000/a:1 ro,user_id=0\n\
                    37 35 98:0 / /proc rw shared:2 - proc proc rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[0].fstype, FS_TYPE);
        assert_eq!(mounts[0].source, "127.0.0.1:5000/a:1");
    }

    #[test]
    fn preflight_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert_eq!(
            preflight(&missing, &Checks::default())
                .unwrap_err()
                .to_string(),
            format!(
                "mountpoint {} does not exist; create it with mkdir -p",
                missing.display()
            )
        );
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            preflight(&file, &Checks::default()),
            Err(MountError::NotADirectory(_))
        ));
        assert!(matches!(
            preflight(Path::new("/proc"), &Checks::default()),
            Err(MountError::AlreadyMounted { .. })
        ));
    }

    #[test]
    fn fuse_conf_decides_allow_other() {
        assert!(!permits_allow_other(
            "# user_allow_other\n#user_allow_other\n"
        ));
        assert!(permits_allow_other(
            "mount_max = 1000\n user_allow_other \n"
        ));
        assert!(!permits_allow_other(""));
    }

    #[test]
    fn unmount_refuses_what_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let err = unmount(dir.path(), false).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "is not a jkmount mount (it is not a mount point); nothing was unmounted"
            ),
            "{err}"
        );
        let err = unmount(Path::new("/proc"), false).unwrap_err();
        assert!(
            err.to_string().contains("it is a proc mount of proc"),
            "{err}"
        );
    }
}
