//! The library's error type: one enum whose variants name the object that failed (reference,
//! digest, layer, path) and say what to do. The command edge adds context with `anyhow`; the
//! FUSE skin has its own small error type in `fs::core`.

use std::io;
use std::path::PathBuf;

use crate::oci::digest::Digest;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between an image reference and a mountable tree.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text given as an image reference cannot be parsed.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// What the user typed.
        input: String,
        /// Why it was refused.
        reason: String,
    },

    /// The text given as a platform cannot be parsed.
    #[error("invalid platform {input:?}: expected OS/ARCH[/VARIANT], for example linux/amd64")]
    InvalidPlatform {
        /// What the user typed.
        input: String,
    },

    /// The registry says the repository or the tag does not exist.
    #[error("{reference}: repository or tag not found on {registry}; check the name and the tag")]
    NotFound {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
    },

    /// The registry has the manifest but not a blob it names.
    #[error(
        "{reference}: {what} {digest} is missing on {registry} (the manifest names it, the registry answered 404); the image was pushed incompletely or its blob was deleted: push it again"
    )]
    BlobNotFound {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// What the blob is (`layer`, `config`, `artifact blob`).
        what: &'static str,
        /// The blob's digest.
        digest: Digest,
    },

    /// A registry that answers a `Range` request with the whole blob (lazy mounts need spans).
    #[error(
        "{reference}: {registry} does not serve byte ranges of blobs, which a lazy mount needs"
    )]
    RangeUnsupported {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
    },

    /// The registry cannot be reached at all.
    #[error(
        "cannot reach registry {registry} for {reference} ({detail}); check the address and that the registry is running, or use what is cached (--pull missing, a digest reference, or --fallback-to-cache with --pull always)"
    )]
    Unreachable {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// The transport's own words.
        detail: String,
    },

    /// The registry to push to cannot be reached at all.
    #[error(
        "cannot reach registry {registry} to push {reference} ({detail}); check the address and that the registry is running"
    )]
    PushUnreachable {
        /// The reference pushed to.
        reference: String,
        /// The registry host.
        registry: String,
        /// The transport's own words.
        detail: String,
    },

    /// The registry's TLS certificate is not trusted.
    #[error(
        "the TLS certificate of registry {registry} is not trusted ({detail}); put its CA certificate in {}/ca.crt (or under --cert-dir), or set tls-verify = false for {registry} in the configuration",
        cert_dir.display()
    )]
    Untrusted {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// The TLS library's words.
        detail: String,
        /// Where a CA certificate for it would be read.
        cert_dir: PathBuf,
    },

    /// The registry wants a client certificate that was not presented (or not accepted).
    #[error(
        "registry {registry} asks for a client certificate ({detail}); put it and its key in {}/client.cert and {}/client.key (or under --cert-dir)",
        cert_dir.display(),
        cert_dir.display()
    )]
    ClientCertificate {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// The TLS library's words.
        detail: String,
        /// Where the client certificate would be read.
        cert_dir: PathBuf,
    },

    /// The registry refused access.
    #[error("registry {registry} refused access to {reference} (unauthorized); {hint}")]
    Unauthorized {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// What to check: the credentials used and where they came from, or how to log in.
        hint: String,
    },

    /// Any other answer from the registry that we cannot use.
    #[error("registry {registry} failed for {reference}: {detail}")]
    Registry {
        /// The image reference.
        reference: String,
        /// The registry host.
        registry: String,
        /// What the registry or transport said.
        detail: String,
    },

    /// Something needed is not cached and the network may not be used.
    #[error(
        "{reference}: {what} is not in the cache, and --offline (or --pull never) forbids asking the registry; run `jkmount pull {reference}` while the registry is reachable"
    )]
    NotCached {
        /// The image reference.
        reference: String,
        /// What was missing: "the tag", "manifest sha256:…", "layer sha256:…".
        what: String,
    },

    /// An index holds no manifest for the requested platform.
    #[error(
        "{reference} has no manifest for platform {platform} (it has: {available}); choose one with --platform"
    )]
    NoMatchingPlatform {
        /// The image reference.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index offers, comma separated.
        available: String,
    },

    /// Bytes did not hash to the digest that names them. Nothing of them was kept.
    #[error(
        "{what} {expected} of {reference} does not match its digest (got {found}); nothing was cached, try again"
    )]
    DigestMismatch {
        /// "manifest", "config", "layer", or "uncompressed layer" (diff_id).
        what: &'static str,
        /// The image reference.
        reference: String,
        /// The digest the bytes should have had.
        expected: Digest,
        /// The digest they had.
        found: Digest,
    },

    /// A blob's length differs from its descriptor.
    #[error(
        "{what} {digest} of {reference} is {found} bytes, its descriptor says {expected}; nothing was cached"
    )]
    SizeMismatch {
        /// "manifest", "config" or "layer".
        what: &'static str,
        /// The image reference.
        reference: String,
        /// The blob's digest.
        digest: Digest,
        /// The size in the descriptor.
        expected: u64,
        /// The size received.
        found: u64,
    },

    /// A manifest, index or config that cannot be used.
    #[error("{what} {digest} of {reference}: {detail}")]
    BadDocument {
        /// "manifest", "index" or "config".
        what: &'static str,
        /// The document's digest, or the tag it came from.
        digest: String,
        /// The image reference.
        reference: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A layer whose content cannot be read or applied.
    #[error("layer {digest} of {reference}: {detail}")]
    BadLayer {
        /// The layer's (compressed) digest, or diff_id when applying.
        digest: Digest,
        /// The image reference.
        reference: String,
        /// What is wrong, naming the path inside the layer where there is one.
        detail: String,
    },

    /// A lazy index (`jkmount index`) that cannot be used for the layer it names.
    #[error(
        "lazy index of layer {layer}: {detail}; rebuild it with `jkmount index IMAGE --push`, or mount without --lazy"
    )]
    BadLazyIndex {
        /// The layer it is said to index.
        layer: Digest,
        /// What is wrong with it.
        detail: String,
    },

    /// A layer's own table of contents (eStargz, zstd:chunked) that cannot serve it lazily:
    /// found so, the layer is pulled whole; found so at completion, the mount refuses it.
    #[error("the table of contents of layer {layer}: {detail}")]
    BadToc {
        /// The layer.
        layer: Digest,
        /// What is wrong with its table.
        detail: String,
    },

    /// A layer `jkmount index` cannot index (it stays eager for lazy mounts).
    #[error("layer {layer} cannot be indexed for lazy mounts: {detail}")]
    Unindexable {
        /// The layer's digest.
        layer: Digest,
        /// Why.
        detail: String,
    },

    /// An OCI image layout directory that cannot be used.
    #[error("OCI layout {}: {detail}", dir.display())]
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// A path asked for with `--subdir` or `--modules` is not a directory of the image.
    #[error(
        "{path} is not a directory in {images}; check --subdir (or that the image holds modules under /jk/modules)"
    )]
    NoSuchSubdir {
        /// The path inside the image.
        path: String,
        /// The images, as given.
        images: String,
    },

    /// An upper (`--upper DIR`) was made over other images than the ones mounted now.
    #[error(
        "the upper {} was made over {made_over}, not over {now}; mount the images it was made over, or give another --upper",
        dir.display()
    )]
    UpperOfOtherImages {
        /// The upper's directory.
        dir: PathBuf,
        /// What it was made over (manifest digests, the subtree).
        made_over: String,
        /// What is mounted now.
        now: String,
    },

    /// An upper is in use by a live mount.
    #[error(
        "the upper {} is in use by another mount; unmount that one first, or give another --upper (to commit it, commit that mount: jkmount commit MOUNTPOINT)",
        dir.display()
    )]
    UpperInUse {
        /// The upper's directory.
        dir: PathBuf,
    },

    /// The operating system refused a file operation on the named path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The cache's own directory is not this user's alone, or a link or file sits where it
    /// keeps a directory.
    #[error("cache directory {} cannot be used: {why}; {fix}", path.display())]
    CacheUnsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// What to do.
        fix: &'static str,
    },

    /// The cache's filesystem is (nearly) full.
    #[error(
        "the cache at {} has only {available} free, {detail}; free some space or choose another --cache-dir",
        path.display()
    )]
    CacheFull {
        /// The cache directory.
        path: PathBuf,
        /// Free space left, human readable.
        available: String,
        /// What was being written.
        detail: String,
    },

    /// A configuration file that cannot be used.
    #[error("configuration {} cannot be used: {detail}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// Credentials that could not be read, or a credential helper that failed.
    #[error("credentials for {registry}: {detail}")]
    Credentials {
        /// The registry host.
        registry: String,
        /// What went wrong (never the secret itself).
        detail: String,
    },

    /// A directory that cannot be packed.
    #[error("cannot pack {}: {detail}", path.display())]
    Pack {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// An extraction that cannot be done.
    #[error("cannot extract to {}: {detail}", path.display())]
    Extract {
        /// The destination or the entry concerned.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// A push that failed.
    #[error("cannot push {reference}: {detail}")]
    Push {
        /// Where to.
        reference: String,
        /// What failed.
        detail: String,
    },

    /// A lockfile that cannot be used.
    #[error("lockfile {} cannot be used: {detail}", path.display())]
    Lockfile {
        /// The lockfile.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// `--locked` and a reference that the lockfile does not pin.
    #[error(
        "{reference} is not pinned in {} (--locked); pin it with `jkmount lock {reference} -o {}`",
        lockfile.display(),
        lockfile.display()
    )]
    NotLocked {
        /// The image reference.
        reference: String,
        /// The lockfile consulted.
        lockfile: PathBuf,
    },

    /// A cache file that exists but cannot be decoded.
    #[error("cache file {} is damaged ({cause}); remove it and try again", path.display())]
    CacheDamaged {
        /// The cache file.
        path: PathBuf,
        /// What is wrong with it: typed, and shown inside the message (not as a `source`,
        /// which the command line would print a second time after it).
        cause: Damage,
    },

    /// Putting the filesystem at its mountpoint, or serving it, failed.
    #[error(transparent)]
    Mount(#[from] crate::mount::MountError),
}

/// What is wrong with a damaged cache file.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    /// A JSON record that does not parse.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A binary file (tree, layer index) whose body does not decode.
    #[error("{0}")]
    Encoding(#[from] postcard::Error),
    /// A tree file whose records do not hold together, or a tree too big for the format.
    #[error("{0}")]
    Tree(String),
    /// A decoded layer without an index of this release's format.
    #[error("layer index missing or of another format")]
    NoIndex,
    /// A blob that was there a moment ago.
    #[error("vanished right after it was stored")]
    Vanished,
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Attaches a path to an `io::Result`.
pub trait IoContext<T> {
    /// Turns the I/O error into [`Error::Io`] naming `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
