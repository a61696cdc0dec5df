//! Backend buffers kept from one pass to the next.

use std::sync::{Mutex, PoisonError};

use crate::backend::Backend;
use crate::error::Result;

/// Buffers of passes that have finished, for the next pass to reuse. A training step's
/// activations and scratch buffers have much the same sizes step after step; allocating them
/// afresh costs the CPU a page fault for every page touched (and a GPU a device allocation per
/// buffer). The pool holds at most what the passes that ran at once held at their peak.
pub(crate) struct BufPool<B: Backend> {
    /// Buffers nobody uses now.
    free: Mutex<Vec<B::Buf>>,
}

impl<B: Backend> BufPool<B> {
    pub(crate) fn new() -> Self {
        BufPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A zero-filled buffer of `len` values: the smallest free buffer that holds them, else the
    /// largest free one grown, else a new one.
    pub(crate) fn take(&self, be: &B, len: usize) -> Result<B::Buf> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let capacity = |i: &usize| be.capacity(&free[*i]);
            let fits = (0..free.len())
                .filter(|i| capacity(i) >= len)
                .min_by_key(capacity);
            fits.or_else(|| (0..free.len()).max_by_key(capacity))
                .map(|i| free.swap_remove(i))
        };
        match reused {
            Some(buf) => be.reuse(buf, len),
            None => be.alloc(len),
        }
    }

    /// Hands buffers back for later passes.
    pub(crate) fn give(&self, bufs: impl IntoIterator<Item = B::Buf>) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(bufs);
    }
}
