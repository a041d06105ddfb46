//! Running a forward on the thread pool, and an output buffer shared by
//! parallel tasks that write disjoint parts of it (columns of a GEMM, rows
//! of attention), without a lock.
//!
//! Invariant: a forward's parallel stages start from a pool thread, so the
//! stages of one forward hand work to the other threads without the caller
//! sleeping and waking between them.

use std::marker::PhantomData;

#[derive(Clone, Copy)]
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only write elements no other task touches (see `slice`).
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _out: PhantomData,
        }
    }

    /// The whole buffer, for one task.
    ///
    /// # Safety
    /// Each task may write only elements that no other task reads or writes
    /// while the tasks run.
    pub(crate) unsafe fn slice(self) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// Runs `f` on a thread of the global pool (in place when already on one).
///
/// A parallel loop started from a thread outside the pool hands its work
/// over and sleeps until it is done, so a forward of ~250 parallel stages
/// started from the engine thread would pay two thread wake-ups per stage;
/// from inside the pool the caller works on its share and the next stage
/// starts at once.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
