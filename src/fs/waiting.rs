//! Reads that may wait on the network — a lazy mount's blocks not fetched yet — and, in a
//! writable lazy mount, changes that may copy such a file up run on a few threads of their
//! own, off the FUSE workers, so lookups and reads of what is already local go on while a
//! registry is slow or away. The threads start with the first such read and end
//! when the mount does (the queue closes).

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

/// Reads that may wait on the network at once before further ones queue.
pub const THREADS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

/// The threads, started on first use.
#[derive(Debug, Default)]
pub struct Waiting {
    queue: OnceLock<Sender<Job>>,
}

impl Waiting {
    /// Runs `job` on one of the threads.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let sent = self.queue.get_or_init(start).send(Box::new(job));
        if let Err(unsent) = sent {
            // Only if every thread died: run it here rather than drop its reply.
            (unsent.0)();
        }
    }
}

fn start() -> Sender<Job> {
    let (sender, receiver) = channel::<Job>();
    let receiver = Arc::new(Mutex::new(receiver));
    for i in 0..THREADS {
        let receiver = receiver.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lazy-read-{i}"))
            .spawn(move || serve(&receiver));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for reads that wait on the network: {e}");
        }
    }
    sender
}

fn serve(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = receiver.lock().expect("not poisoned").recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn jobs_that_wait_do_not_hold_up_the_others() {
        let waiting = Waiting::default();
        // THREADS - 1 jobs wait on the barrier, which the last job opens: this only ends if
        // they run at once.
        let barrier = Arc::new(Barrier::new(THREADS));
        let (done, finished) = channel();
        for _ in 0..THREADS {
            let (barrier, done) = (barrier.clone(), done.clone());
            waiting.run(move || {
                barrier.wait();
                done.send(()).unwrap();
            });
        }
        for _ in 0..THREADS {
            finished
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap();
        }
    }
}
