//! An output buffer shared by parallel tasks that write disjoint parts of it
//! (columns of a GEMM, rows of attention), without a lock.

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
