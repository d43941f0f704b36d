//! `jkmount config`: the registry configuration in effect (the file it came from, every
//! setting with its default filled in) and where credentials and certificates are looked for.

use jkmount::source::registry::config::DOCKER_CERTS_DIR;
use jkmount::source::registry::credentials::CredentialSources;

use super::{GlobalArgs, load_config};

/// Prints the effective configuration as TOML, with the lookup paths as comments.
pub fn run(global: &GlobalArgs) -> anyhow::Result<()> {
    let (path, config) = load_config(global)?;
    match &path {
        Some(path) => println!("# from {}", path.display()),
        None => println!("# no configuration file: built-in defaults"),
    }
    let sources = CredentialSources::new(None, global.authfile.clone());
    println!("# credentials, in order: --username, then");
    for file in sources.files() {
        println!("#   {}", file.display());
    }
    let certs = global
        .cert_dir
        .as_ref()
        .map_or(DOCKER_CERTS_DIR.to_owned(), |d| d.display().to_string());
    println!("# certificates: {certs}/HOST[:PORT]/*.crt (unless a registry sets cert-dir)");
    print!("{}", config.to_text());
    Ok(())
}
