//! Serving in the background: the command forks (while it has one thread, before any runtime
//! exists) and the parent waits on a readiness pipe until the server says the mount is live,
//! or returns the server's own exit status. The server is the same process image, so nothing
//! is executed or parsed again and a password asked for stays in memory. In the foreground
//! under systemd (`Type=notify`), readiness goes to the service manager instead.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::OwnedFd;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use crate::error::{IoContext, Result};

/// What the server writes on the readiness pipe once the mount is live.
const READY: &str = "ready";

/// How the background server ended its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// The mount is live and the server detached.
    Ready,
    /// The server failed (and said why on the shared stderr) with this exit status.
    Failed(u8),
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Forked {
    /// The command, after the server said how its start went.
    Waited(Started),
    /// The server, to report readiness through this once the mount is live.
    Server(Readiness),
}

/// Where a live mount is reported: the waiting command's pipe, or the service manager.
#[derive(Debug)]
pub struct Readiness(Option<OwnedFd>);

/// Forks the background server and, in the parent, waits until it reports the mount live or
/// exits. Refused if the process has more than one thread (a fork copies only the caller's).
pub fn fork_server() -> Result<Forked> {
    // Close-on-exec: a program the server runs (fusermount3) must not hold the pipe open, or
    // the command would wait for it as well.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(io::Error::from)
        .at("the readiness pipe")?;
    io::stdout().flush().at("stdout")?;
    match fork_single_threaded().at("forking the background jkmount")? {
        ForkResult::Parent { child } => {
            drop(write);
            wait_for(child, read).map(Forked::Waited)
        }
        ForkResult::Child => {
            drop(read);
            become_server().at("the background jkmount")?;
            Ok(Forked::Server(Readiness(Some(write))))
        }
    }
}

#[allow(unsafe_code)]
fn fork_single_threaded() -> io::Result<ForkResult> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(io::Error::other(format!(
            "the command has {threads:?} threads where it should have one"
        )));
    }
    // SAFETY: the process has one thread (checked just above), so the child is a whole copy:
    // no lock or allocator state is held by a thread that does not exist in it.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// The parent's side: `ready` on the pipe, or the server's exit status.
fn wait_for(child: Pid, read: OwnedFd) -> Result<Started> {
    let mut line = String::new();
    BufReader::new(File::from(read))
        .read_line(&mut line)
        .at("the background jkmount's readiness pipe")?;
    if line.trim_end() == READY {
        return Ok(Started::Ready);
    }
    let code = match waitpid(child, None).map_err(io::Error::from) {
        Ok(WaitStatus::Exited(_, code)) => u8::try_from(code).ok().filter(|&c| c != 0),
        Ok(_) => None,
        Err(e) => return Err(e).at("the background jkmount"),
    };
    Ok(Started::Failed(code.unwrap_or(1)))
}

/// In the server: a new session, stdin closed, and — until the mount is reported live — death
/// with the command that waits for it (Ctrl-C, a killed CI step): a mount nobody waits for must
/// not appear later.
fn become_server() -> io::Result<()> {
    let parent = nix::unistd::getppid();
    nix::unistd::setsid()?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other("the command that started it has gone"));
    }
    let null = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    Ok(())
}

impl Readiness {
    /// For a server in the foreground: readiness goes to the service manager, if any.
    pub fn foreground() -> Readiness {
        Readiness(None)
    }

    /// Tells whoever waits that the mount is live. The background server then lets go of its
    /// command: stdout and stderr go to /dev/null so nothing holds the caller's pipes open, and
    /// it no longer dies with it. An error means the command is gone, and the mount is taken
    /// down.
    /// `server`: the PID of the running server that took the mount, when not this process;
    /// a service manager is told it is the service's main process now.
    pub fn report(self, status: &str, server: Option<u32>) -> io::Result<()> {
        let Some(pipe) = self.0 else {
            notify_service_manager(status, server);
            return Ok(());
        };
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        nix::sys::prctl::set_pdeathsig(None)?;
        let mut pipe = File::from(pipe);
        writeln!(pipe, "{READY}")?;
        drop(pipe);
        io::stdout().flush()?;
        nix::unistd::dup2_stderr(&null)?;
        nix::unistd::dup2_stdout(&null)?;
        Ok(())
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`, as `Type=notify` does) that the
/// mount is live, and which process serves it when another one does (`MAINPID=`). Without
/// `NOTIFY_SOCKET` this does nothing.
fn notify_service_manager(status: &str, server: Option<u32>) {
    use sd_notify::NotifyState;
    let mut states = vec![NotifyState::Ready, NotifyState::Status(status)];
    states.extend(server.map(NotifyState::MainPid));
    if let Err(e) = sd_notify::notify(&states) {
        // The mount is live either way; a service manager that cannot be told will time out.
        tracing::warn!("cannot notify the service manager that the mount is ready: {e}");
    }
}
