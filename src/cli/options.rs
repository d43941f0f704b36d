//! `-o OPTION[,OPTION...]`, as `mount -t fuse.jkmount`, an fstab line and `mount.fuse3` pass
//! them: jkmount's own options (`modules`, `subdir=`, `cache_dir=`, …), the standard ones it
//! honours (`allow_other`, `noexec`), the ones it accepts because a jkmount mount always
//! behaves so (`ro`, `nosuid`, `nodev`, `default_permissions`), and the ones meant for mount(8)
//! or systemd (`_netdev`, `noauto`, `x-systemd.*`, …), which are passed over.

use std::path::PathBuf;

use super::PullPolicy;

/// What the `-o` options ask for; `None`/`false` where they say nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// `modules`: present /jk/modules.
    pub modules: bool,
    /// `subdir=PATH`.
    pub subdir: Option<String>,
    /// `cache_dir=DIR`.
    pub cache_dir: Option<PathBuf>,
    /// `platform=OS/ARCH[/VARIANT]`.
    pub platform: Option<String>,
    /// `lockfile=FILE`.
    pub lockfile: Option<PathBuf>,
    /// `pull=missing|always|never`.
    pub pull: Option<PullPolicy>,
    /// `offline`.
    pub offline: bool,
    /// `config=FILE`: the registry configuration.
    pub config: Option<PathBuf>,
    /// `authfile=FILE`: the credentials file.
    pub authfile: Option<PathBuf>,
    /// `writable`: changes go to an upper layer (never plain `rw`, which mount(8) gives every
    /// helper whose fstab line lacks `ro`).
    pub writable: bool,
    /// `upper=DIR`: keep the changes in DIR (implies `writable`).
    pub upper: Option<PathBuf>,
    /// `passthrough`: the kernel reads big files from backing files in the cache.
    pub passthrough: bool,
    /// `no_prefill`: the kernel asks for every file's bytes, small ones too.
    pub no_prefill: bool,
    /// `lazy`: serve layers that have a lazy index before they are downloaded.
    pub lazy: bool,
    /// `no_background_fetch`: with `lazy`, fetch only what is read.
    pub no_background_fetch: bool,
    /// `allow_other`: users other than the one mounting may read the mount.
    pub allow_other: bool,
    /// `noexec`: files in the mount cannot be executed.
    pub noexec: bool,
    /// `nonempty`: mount over a directory that has entries (hiding them). jkmount's own
    /// check; never handed to `fusermount3`, some versions of which reject it.
    pub nonempty: bool,
    /// `allow_shared_parent`: mount although another user may change the mountpoint's
    /// parent (the mount still goes on the directory that was checked).
    pub allow_shared_parent: bool,
}

/// Options a jkmount mount has whatever is asked, or that change nothing for it: `rw` and
/// `suid`/`dev` are accepted (mount(8) adds them by itself) but the mount stays
/// `nosuid,nodev`, and `ro` unless `writable` is asked for by name.
const ALWAYS_SO: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "exec",
    "default_permissions",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "async",
    "sync",
    "defaults",
];

/// Options for mount(8), fstab and systemd rather than the filesystem. `mount.fuse3` drops
/// most of them before it runs jkmount; they are accepted here for when jkmount is run by hand
/// with an fstab line's options.
const FOR_MOUNT: &[&str] = &[
    "_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "owner", "group",
];

/// Option names with a value, for the error message.
const OWN_WITH_VALUE: &[&str] = &[
    "subdir",
    "cache_dir",
    "platform",
    "lockfile",
    "pull",
    "config",
    "authfile",
    "upper",
];

impl MountOptions {
    /// Parses every `-o` argument (each a comma-separated list).
    pub fn parse(lists: &[String]) -> anyhow::Result<Self> {
        let mut out = MountOptions::default();
        for option in lists.iter().flat_map(|l| l.split(',')) {
            out.apply(option)?;
        }
        Ok(out)
    }

    fn apply(&mut self, option: &str) -> anyhow::Result<()> {
        let (name, value) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (option, None),
        };
        let value = |what: &str| -> anyhow::Result<String> {
            match value {
                Some(v) if !v.is_empty() => Ok(v.to_owned()),
                _ => anyhow::bail!("mount option {name} needs a value: {name}={what}"),
            }
        };
        match name {
            "" => {}
            "modules" => self.modules = true,
            "subdir" => self.subdir = Some(value("PATH")?),
            "cache_dir" => self.cache_dir = Some(value("DIR")?.into()),
            "platform" => self.platform = Some(value("OS/ARCH")?),
            "lockfile" => self.lockfile = Some(value("FILE")?.into()),
            "config" => self.config = Some(value("FILE")?.into()),
            "authfile" => self.authfile = Some(value("FILE")?.into()),
            "pull" => {
                self.pull = Some(match value("missing|always|never")?.as_str() {
                    "missing" => PullPolicy::Missing,
                    "always" => PullPolicy::Always,
                    "never" => PullPolicy::Never,
                    other => anyhow::bail!(
                        "mount option pull={other} is not one of missing, always, never"
                    ),
                })
            }
            "offline" => self.offline = true,
            "writable" => self.writable = true,
            "passthrough" => self.passthrough = true,
            "no_prefill" => self.no_prefill = true,
            "lazy" => self.lazy = true,
            "no_background_fetch" => self.no_background_fetch = true,
            "upper" => self.upper = Some(value("DIR")?.into()),
            "allow_other" => self.allow_other = true,
            "noexec" => self.noexec = true,
            "nonempty" => self.nonempty = true,
            "allow_shared_parent" => self.allow_shared_parent = true,
            "allow_root" => anyhow::bail!(
                "mount option allow_root is not supported: use allow_other (with user_allow_other in /etc/fuse.conf for non-root mounts)"
            ),
            _ if ALWAYS_SO.contains(&name) || FOR_MOUNT.contains(&name) => {}
            _ if name.starts_with("x-") || name.starts_with("comment") => {}
            _ if name == "fsname" || name == "subtype" => {}
            _ => anyhow::bail!(
                "unknown mount option {option:?}; jkmount takes modules, offline, writable, passthrough, no_prefill, lazy, no_background_fetch, allow_other, noexec, nonempty, allow_shared_parent, {}=…, and the standard ro, nosuid, nodev, _netdev, noauto, x-systemd.*",
                OWN_WITH_VALUE.join("=…, ")
            ),
        }
        Ok(())
    }
}

/// Splits the image arguments of a mount: one argument (an fstab source) may stack several
/// images joined by `+`, which no image reference contains.
pub fn split_images(targets: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for target in targets {
        for part in target.split('+') {
            if part.is_empty() {
                anyhow::bail!(
                    "{target:?} has an empty image: images in one argument are joined by a single +, as in repo/a:1+repo/b:2"
                );
            }
            out.push(part.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<MountOptions> {
        MountOptions::parse(&[text.to_owned()])
    }

    #[test]
    fn own_options_are_read() {
        let got = parse(
            "ro,allow_other,modules,cache_dir=/var/cache/jk,platform=linux/arm64,lockfile=/etc/jk.lock,pull=always,noexec,config=/c.toml,authfile=/a.json,offline,nonempty,allow_shared_parent,writable,upper=/var/lib/up,passthrough,no_prefill,lazy,no_background_fetch",
        )
        .unwrap();
        assert_eq!(
            got,
            MountOptions {
                modules: true,
                subdir: None,
                cache_dir: Some("/var/cache/jk".into()),
                platform: Some("linux/arm64".into()),
                lockfile: Some("/etc/jk.lock".into()),
                pull: Some(PullPolicy::Always),
                offline: true,
                config: Some("/c.toml".into()),
                authfile: Some("/a.json".into()),
                writable: true,
                upper: Some("/var/lib/up".into()),
                passthrough: true,
                no_prefill: true,
                lazy: true,
                no_background_fetch: true,
                allow_other: true,
                noexec: true,
                nonempty: true,
                allow_shared_parent: true,
            }
        );
        assert_eq!(
            MountOptions::parse(&["subdir=/srv/www".into(), "pull=never".into()])
                .unwrap()
                .subdir
                .as_deref(),
            Some("/srv/www")
        );
    }

    #[test]
    fn standard_and_fstab_options_are_passed_over() {
        let got = parse(
            "rw,dev,suid,nosuid,nodev,default_permissions,_netdev,noauto,nofail,x-systemd.requires=network-online.target,x-systemd.automount,comment=x,defaults,noatime",
        )
        .unwrap();
        assert_eq!(got, MountOptions::default());
    }

    #[test]
    fn bad_options_are_named() {
        let err = parse("ro,colour=blue").unwrap_err().to_string();
        assert!(
            err.starts_with("unknown mount option \"colour=blue\"; jkmount takes modules"),
            "{err}"
        );
        assert!(err.contains("cache_dir=…"), "{err}");
        assert_eq!(
            parse("subdir").unwrap_err().to_string(),
            "mount option subdir needs a value: subdir=PATH"
        );
        assert_eq!(
            parse("pull=sometimes").unwrap_err().to_string(),
            "mount option pull=sometimes is not one of missing, always, never"
        );
        assert!(parse("allow_root").is_err());
    }

    #[test]
    fn sources_stack_images_with_plus() {
        let got = split_images(&[
            "127.0.0.1:5000/a:1+127.0.0.1:5000/b@sha256:00".into(),
            "oci:/x:y".into(),
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                "127.0.0.1:5000/a:1",
                "127.0.0.1:5000/b@sha256:00",
                "oci:/x:y"
            ]
        );
        assert!(split_images(&["a++b".into()]).is_err());
    }
}
