//! Serving in the background: the command re-runs itself as a detached server and waits on a
//! readiness pipe (the server's stdout) until the server says the mount is live, or returns
//! the server's own exit status. A password given on the command line reaches the server on
//! its stdin, never in its arguments or environment. In the foreground under systemd
//! (`Type=notify`), readiness goes to the service manager instead.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::error::{IoContext, Result};

/// Set in the environment of the detached server so it reports readiness on stdout.
const SERVER_ENV: &str = "JKMOUNT_BACKGROUND_SERVER";
/// Set for the background server when the password follows on its stdin.
pub const PASSWORD_ON_STDIN_ENV: &str = "JKMOUNT_PASSWORD_ON_STDIN";
/// What the server writes on its stdout once the mount is live.
const READY: &str = "ready";

/// Whether this process is the detached server of a waiting command.
pub fn is_server() -> bool {
    std::env::var_os(SERVER_ENV).is_some()
}

/// How the background server ended its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The mount is live and the server detached.
    Ready,
    /// The server failed (and said why on the shared stderr) with this exit status.
    Failed(u8),
}

/// Re-runs this executable with `args` as a detached server and waits until it reports the
/// mount live or exits. `password` is written to the server's stdin.
pub fn start_server(
    args: impl IntoIterator<Item = OsString>,
    password: Option<&str>,
) -> Result<Started> {
    let exe = std::env::current_exe().at("the jkmount executable")?;
    let mut command = Command::new(&exe);
    command
        .args(args)
        .env(SERVER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if password.is_some() {
        command
            .env(PASSWORD_ON_STDIN_ENV, "1")
            .stdin(Stdio::piped());
    }
    let mut child = command.spawn().at(&exe)?;
    if let Some(password) = password {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        writeln!(stdin, "{password}").at("the background jkmount's stdin")?;
    }
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .at("the background jkmount's readiness pipe")?;
    if line.trim_end() == READY {
        return Ok(Started::Ready);
    }
    let status = child.wait().at("the background jkmount")?;
    let code = status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
        .unwrap_or(1);
    Ok(Started::Failed(code))
}

/// In the server: a new session, and — until the mount is reported live — death with the
/// command that waits for it (Ctrl-C, a killed CI step): a mount nobody waits for must not
/// appear later.
pub fn become_server() -> io::Result<()> {
    nix::unistd::setsid()?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    Ok(())
}

/// Tells whoever waits that the mount is live: the waiting command (in the server) or the
/// service manager (in the foreground).
pub fn report_ready(status: &str) -> io::Result<()> {
    if is_server() {
        release_parent()
    } else {
        notify_service_manager(status);
        Ok(())
    }
}

/// Tells the waiting parent that the mount is live, then lets go of it: stdout and stderr go
/// to /dev/null so nothing holds the caller's pipes open, and the server no longer dies with
/// the parent. An error means the parent is gone, and the mount is taken down.
fn release_parent() -> io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::sys::prctl::set_pdeathsig(None)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{READY}")?;
    out.flush()?;
    nix::unistd::dup2_stderr(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    Ok(())
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`, as `Type=notify` does) that the
/// mount is live. Without `NOTIFY_SOCKET` this does nothing.
fn notify_service_manager(status: &str) {
    use sd_notify::NotifyState;
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        // The mount is live either way; a service manager that cannot be told will time out.
        tracing::warn!("cannot notify the service manager that the mount is ready: {e}");
    }
}
