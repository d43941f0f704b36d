//! `jkmount completions SHELL` and `jkmount man DIR`: shell completions and man pages made
//! from the clap definitions, so they never drift from `--help`. `make install` and the Debian
//! package install both.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// Arguments of `jkmount completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Arguments of `jkmount man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Where to write jkmount.1 and a page per subcommand (jkmount-pull.1, …).
    dir: PathBuf,
}

/// Prints the completion script for a shell on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "jkmount",
        &mut std::io::stdout(),
    );
    Ok(())
}

/// Writes the man pages.
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    clap_mangen::generate_to(Cli::command(), &args.dir)
        .with_context(|| format!("cannot write man pages to {}", args.dir.display()))
}
