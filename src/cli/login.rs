//! `jkmount login REGISTRY` and `jkmount logout REGISTRY`: check credentials against the
//! registry and keep them where Docker and podman keep theirs (the first auth file of the
//! lookup order, or its credential helper), or forget them.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use clap::Args;
use jkmount::source::registry::config;
use jkmount::source::registry::credentials::{AuthFile, CredentialSources, Secret};

use super::{GlobalArgs, explicit_secret, registries, runtime};

/// Arguments of `jkmount login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The registry: host[:port] as in image references (docker.io for Docker Hub).
    registry: String,
}

/// Arguments of `jkmount logout`.
#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// The registry whose credentials to forget.
    registry: String,
}

fn ask_username() -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "give the user name with --username (and the password with --password-stdin)"
        );
    }
    eprint!("Username: ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// The key an auth file records `registry` under: Docker's own spelling for Docker Hub in
/// Docker's config.json, the host as given elsewhere.
fn file_key(registry: &str, file: &std::path::Path) -> String {
    let hub = config::is_docker_hub(registry);
    match (hub, file.file_name().is_some_and(|n| n == "config.json")) {
        (true, true) => config::DOCKER_HUB_AUTH_KEY.into(),
        (true, false) => config::DOCKER_HUB.into(),
        _ => registry.to_owned(),
    }
}

/// Checks the credentials, then stores them.
pub fn login(args: LoginArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let (username, password) = match explicit_secret(global)? {
        Some(Secret::Password { username, password }) => (username, password),
        _ => {
            let username = ask_username()?;
            let password = rpassword::prompt_password("Password: ")
                .map(zeroize::Zeroizing::new)
                .context("cannot read the password")?;
            (username, password)
        }
    };
    let registries = registries(global)?;
    runtime()?.block_on(jkmount::source::registry::check_login(
        &registries,
        config::api_host(&args.registry),
        &username,
        &password,
    ))?;
    let sources = CredentialSources::new(None, global.authfile.clone());
    let file = sources
        .login_file()
        .context("nowhere to store credentials: set --authfile, XDG_RUNTIME_DIR or HOME")?;
    let mut auth = AuthFile::read(&file)?.unwrap_or_default();
    auth.store(&file_key(&args.registry, &file), &username, &password)?;
    auth.write(&file)?;
    println!(
        "Login succeeded: credentials for {} kept in {}",
        args.registry,
        file.display()
    );
    Ok(())
}

/// Removes the registry's credentials from every auth file that has them.
pub fn logout(args: LogoutArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let sources = CredentialSources::new(None, global.authfile.clone());
    let mut removed = Vec::new();
    for file in sources.files() {
        let Some(mut auth) = AuthFile::read(file)? else {
            continue;
        };
        if auth.erase(&file_key(&args.registry, file))? {
            auth.write(file)?;
            removed.push(file.display().to_string());
        }
    }
    if removed.is_empty() {
        let looked: Vec<String> = sources
            .files()
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        anyhow::bail!(
            "no credentials for {} in {}",
            args.registry,
            looked.join(", ")
        );
    }
    println!(
        "Removed the credentials for {} from {}",
        args.registry,
        removed.join(", ")
    );
    Ok(())
}
