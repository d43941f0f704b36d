//! Lockfiles at the command line: `jkmount lock IMAGE... [-o FILE] [--update]`, and the
//! `--lockfile`/`--no-lockfile`/`--locked` options with which mounts and pulls use the pins.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use jkmount::app::lockfile::{DEFAULT_NAME, Lockfile, Pin};
use jkmount::app::pull::{PullOptions, PullPolicy};

use jkmount::oci::platform::Platform;
use jkmount::oci::reference::ImageRef;

use super::{GlobalArgs, open_cache, parse_images, parse_platform, runtime};

/// Arguments of `jkmount lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// Images to pin (registry references, or oci:DIR[:TAG]). With --update and none given,
    /// every pin of the lockfile is re-resolved.
    #[arg(value_name = "IMAGE")]
    images: Vec<String>,
    /// The lockfile to write (read first if it exists).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_NAME)]
    output: PathBuf,
    /// Move existing pins to what the references point to now.
    #[arg(long)]
    update: bool,
    /// Platform to pin from multi-platform images, OS/ARCH[/VARIANT] [default: this machine]
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Resolve tags from the cache only, never asking the registry
    #[arg(long)]
    offline: bool,
}

/// How mounts and pulls find their lockfile.
#[derive(Debug, Args)]
pub struct LockfileArgs {
    /// Mount exactly the digests pinned in FILE [default: ./jkmount.lock when it exists]
    #[arg(long, value_name = "FILE", env = "JKMOUNT_LOCKFILE")]
    lockfile: Option<PathBuf>,
    /// Ignore ./jkmount.lock.
    #[arg(long, conflicts_with_all = ["lockfile", "locked"])]
    no_lockfile: bool,
    /// Fail if an image is not pinned in the lockfile (for CI).
    #[arg(long)]
    locked: bool,
}

/// A lockfile in use, with where it came from.
pub struct InUse {
    path: PathBuf,
    file: Lockfile,
}

impl LockfileArgs {
    /// Uses `path` as the lockfile (the `lockfile=` mount option).
    pub fn use_file(&mut self, path: PathBuf) {
        self.lockfile = Some(path);
        self.no_lockfile = false;
    }

    /// The lockfile to use, if any.
    pub fn load(&self) -> anyhow::Result<Option<InUse>> {
        let path = match (&self.lockfile, self.no_lockfile) {
            (Some(path), _) => path.clone(),
            (None, true) => return Ok(None),
            (None, false) => {
                let found = PathBuf::from(DEFAULT_NAME);
                if !found.is_file() {
                    if self.locked {
                        anyhow::bail!(
                            "--locked needs a lockfile: give --lockfile FILE or create {DEFAULT_NAME} with `jkmount lock IMAGE...`"
                        );
                    }
                    return Ok(None);
                }
                found
            }
        };
        if !path.is_file() {
            anyhow::bail!(
                "lockfile {} not found; create it with `jkmount lock IMAGE... -o {}`",
                path.display(),
                path.display()
            );
        }
        let file = Lockfile::load(&path)?;
        tracing::debug!("using the pins in {}", path.display());
        Ok(Some(InUse { path, file }))
    }

    /// The pin for each image (none for digest references, which pin themselves).
    pub fn pins(
        &self,
        lockfile: Option<&InUse>,
        images: &[ImageRef],
        platform: &Platform,
    ) -> anyhow::Result<Vec<Option<Pin>>> {
        images
            .iter()
            .map(|image| {
                let reference = image.to_string();
                let pin = lockfile.and_then(|l| l.file.find(&reference, platform));
                match (pin, lockfile) {
                    (Some(pin), _) => Ok(Some(pin.clone())),
                    (None, Some(l)) if self.locked && !is_digest(image) => {
                        Err(jkmount::Error::NotLocked {
                            reference,
                            lockfile: l.path.clone(),
                        }
                        .into())
                    }
                    _ => Ok(None),
                }
            })
            .collect()
    }
}

impl InUse {
    /// The lockfile's path (registered with the cache, whose `gc` keeps its pins).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn is_digest(image: &ImageRef) -> bool {
    matches!(image, ImageRef::Registry(r) if r.digest().is_some())
}

/// Resolves the images and writes their pins.
pub fn run(args: LockArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let mut file = if args.output.exists() {
        Lockfile::load(&args.output)?
    } else {
        Lockfile::new()
    };
    let targets = targets(&args, &file)?;
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let runtime = runtime()?;
    let registries = std::sync::Arc::new(super::registries(global)?);
    for (image, platform) in targets {
        let options = PullOptions {
            platform,
            policy: if args.offline {
                PullPolicy::Never
            } else {
                PullPolicy::Always
            },
            registries: registries.clone(),
            ..PullOptions::host()
        };
        let resolved = runtime.block_on(jkmount::app::pull::resolve(&cache, &image, &options))?;
        let reference = image.to_string();
        let new = resolved.pin(reference.clone(), &options.platform);
        let old = file.find(&reference, &options.platform).cloned();
        match old {
            Some(old) if old == new => println!("{reference}: unchanged {}", new.top()),
            Some(old) if !args.update => {
                tracing::warn!(
                    "{reference} has moved: {} pins {}, the registry now has {}; keeping the pin. \
                     Run `jkmount lock --update {reference}` to move it",
                    args.output.display(),
                    old.top(),
                    new.top()
                );
                println!("{reference}: kept {}", old.top());
            }
            Some(old) => {
                println!("{reference}: {} -> {}", old.top(), new.top());
                file.set(new);
            }
            None => {
                println!("{reference}: pinned {}", new.top());
                file.set(new);
            }
        }
    }
    file.save(&args.output)?;
    cache
        .add_lockfile_root(&args.output)
        .with_context(|| format!("cannot register {} with the cache", args.output.display()))?;
    Ok(())
}

/// The images to resolve, each with the platform to pin.
fn targets(args: &LockArgs, file: &Lockfile) -> anyhow::Result<Vec<(ImageRef, Platform)>> {
    if !args.images.is_empty() {
        let platform = parse_platform(args.platform.as_deref())?;
        let images = parse_images(&args.images)?;
        return Ok(images.into_iter().map(|i| (i, platform.clone())).collect());
    }
    if !args.update {
        anyhow::bail!(
            "name the images to pin, or give --update to re-resolve every pin in {}",
            args.output.display()
        );
    }
    if file.pins().is_empty() {
        anyhow::bail!("{} pins nothing to update", args.output.display());
    }
    file.pins()
        .iter()
        .map(|pin| {
            let platform = match (&args.platform, &pin.platform) {
                (Some(text), _) | (None, Some(text)) => text.parse::<Platform>()?,
                (None, None) => Platform::host(),
            };
            Ok((ImageRef::parse(&pin.reference)?, platform))
        })
        .collect()
}
