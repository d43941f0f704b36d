//! The `jkmount` command: parse, set up logging, dispatch, map the outcome to an exit code
//! (0 success, 1 failure, 2 usage). Everything else is in the subcommand files under `cli/`
//! and in the library.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse_checked();
    cli::init_logging(&args.global);
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(cli::AlreadyReported(code)) = e.downcast_ref() {
                return ExitCode::from(*code);
            }
            eprintln!("jkmount: error: {}", cli::one_line(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
