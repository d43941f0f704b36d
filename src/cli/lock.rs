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
    let records = cache.image_records()?;
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
        let mut new = resolved.pin(reference.clone(), &options.platform);
        let old = file.find(&reference, &options.platform).cloned();
        if args.offline {
            // The registry was not asked for a lazy index: a pinned one stays.
            new.lazy = old.as_ref().and_then(|o| o.lazy.clone());
        }
        let chosen = settle(&args, old, new);
        report_unpinned_lazy(&records, &reference, &chosen);
        file.set(chosen);
    }
    file.save(&args.output)?;
    cache
        .add_lockfile_root(&args.output)
        .with_context(|| format!("cannot register {} with the cache", args.output.display()))?;
    Ok(())
}

/// The pin to keep of `old` and `new` (what the registry has now), said on standard output: a
/// moved image or lazy index moves only with --update; a lazy index is pinned beside an
/// unchanged image pinned without one.
fn settle(args: &LockArgs, old: Option<Pin>, new: Pin) -> Pin {
    let reference = new.reference.clone();
    let Some(old) = old else {
        match &new.lazy {
            Some(lazy) => println!("{reference}: pinned {} (lazy index {lazy})", new.top()),
            None => println!("{reference}: pinned {}", new.top()),
        }
        return new;
    };
    if old == new {
        println!("{reference}: unchanged {}", new.top());
        return old;
    }
    let lockfile = args.output.display();
    if old.same_image(&new) {
        let now = new
            .lazy
            .as_ref()
            .map_or("none".to_owned(), ToString::to_string);
        return match (&old.lazy, &new.lazy) {
            (None, Some(lazy)) => {
                println!(
                    "{reference}: unchanged {}, lazy index {lazy} pinned",
                    new.top()
                );
                new
            }
            (Some(was), _) if !args.update => {
                tracing::warn!(
                    "{reference}: {lockfile} pins lazy index {was}, the registry now has {now}; keeping the pin. Run `jkmount lock --update {reference}` to move it"
                );
                println!("{reference}: kept {} (lazy index {was})", old.top());
                old
            }
            _ => {
                println!("{reference}: unchanged {}, lazy index now {now}", new.top());
                new
            }
        };
    }
    if !args.update {
        tracing::warn!(
            "{reference} has moved: {lockfile} pins {}, the registry now has {}; keeping the pin. \
             Run `jkmount lock --update {reference}` to move it",
            old.top(),
            new.top()
        );
        println!("{reference}: kept {}", old.top());
        return old;
    }
    println!("{reference}: {} -> {}", old.top(), new.top());
    new
}

/// Says when a `--lazy` mount of the pinned image used a lazy index the pin does not name (the
/// cache records the one last used, pinned or not).
fn report_unpinned_lazy(
    records: &[jkmount::cache::records::ImageRecord],
    reference: &str,
    pin: &Pin,
) {
    let used = records
        .iter()
        .filter(|r| r.manifest == pin.digest)
        .filter_map(|r| r.lazy.as_ref());
    for lazy in used.filter(|l| pin.lazy.as_ref() != Some(*l)) {
        tracing::warn!(
            "{reference}: a --lazy mount used lazy index {lazy}, which this lockfile does not pin"
        );
    }
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
