//! Which chunks of a lazy layer reads are fetching now. A read that needs a chunk another
//! read is fetching waits for that read instead of asking the registry again: the kernel
//! reads a big file ahead in several requests at once, whose spans share chunks. A claim is
//! given back however its fetch ends, a panic too.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The chunks being fetched, kept under the same lock as which chunks are here.
#[derive(Debug, Default)]
pub struct Claims(HashSet<usize>);

impl Claims {
    /// Whether a read is fetching chunk `c`.
    pub fn is_claimed(&self, c: usize) -> bool {
        self.0.contains(&c)
    }
}

/// State that holds [`Claims`] beside the chunks' presence.
pub trait Claiming {
    /// The claims.
    fn claims(&mut self) -> &mut Claims;
}

/// Waits on `released` while chunk `c` is claimed; returns the lock, `c` then unclaimed.
pub fn wait_unclaimed<'a, T: Claiming>(
    mut state: MutexGuard<'a, T>,
    released: &Condvar,
    c: usize,
) -> MutexGuard<'a, T> {
    while state.claims().is_claimed(c) {
        state = released.wait(state).unwrap_or_else(|e| e.into_inner());
    }
    state
}

/// Chunks `group`, claimed under `state`'s lock until this is dropped.
pub struct Claimed<'a, T: Claiming> {
    state: &'a Mutex<T>,
    released: &'a Condvar,
    group: Range<usize>,
}

impl<'a, T: Claiming> Claimed<'a, T> {
    /// Claims `group` in `locked` (the guard of `state`, which the caller goes on holding).
    pub fn new(
        state: &'a Mutex<T>,
        locked: &mut T,
        released: &'a Condvar,
        group: Range<usize>,
    ) -> Claimed<'a, T> {
        locked.claims().0.extend(group.clone());
        Claimed {
            state,
            released,
            group,
        }
    }
}

impl<T: Claiming> Claimed<'_, T> {
    /// The chunks claimed.
    pub fn group(&self) -> Range<usize> {
        self.group.clone()
    }
}

impl<T: Claiming> Drop for Claimed<'_, T> {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for c in self.group.clone() {
            state.claims().0.remove(&c);
        }
        drop(state);
        self.released.notify_all();
    }
}
