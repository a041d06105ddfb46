//! Zeroed buffers that start on a cache line.
//!
//! Invariant: the first element of a [`Lines`] sits on a 64-byte boundary,
//! so the kernels' 64-byte loads of strip data, scales and unpacked bytes
//! at multiples of 64 each touch one cache line (a buffer from `vec!` may
//! start anywhere the allocator puts it, and then every such load spans
//! two lines, by chance differently from one copy of a model to the next).

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Element types whose all-zero bytes are the value zero.
pub(crate) trait Zeroable: Copy {}
impl Zeroable for u8 {}
impl Zeroable for i8 {}
impl Zeroable for f32 {}

/// `len` values of `T`, zeroed, on cache-line-aligned storage.
pub(crate) struct Lines<T: Zeroable> {
    lines: Vec<Line>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Zeroable> Lines<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        Lines {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _values: PhantomData,
        }
    }

    /// At least `len` values; new ones zero, old ones kept.
    pub(crate) fn grow_to(&mut self, len: usize) {
        if len > self.len {
            let bytes = len * std::mem::size_of::<T>();
            self.lines.resize(bytes.div_ceil(64), Line([0; 64]));
            self.len = len;
        }
    }
}

impl<T: Zeroable> Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len * size_of::<T>()` initialised
        // bytes, aligned for any `T` of alignment up to 64, and every bit
        // pattern reached through `Zeroable` types is a valid value.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Zeroable> DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_line_and_hold_zeros() {
        for len in [0, 1, 63, 64, 65, 1000] {
            let mut b = Lines::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            assert_eq!(b.as_ptr() as usize % 64, 0);
            if len > 0 {
                b[len - 1] = 2.5;
            }
            b.grow_to(len + 100);
            assert_eq!(b.len(), len + 100);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert!(len == 0 || b[len - 1] == 2.5);
            assert!(b[len..].iter().all(|&v| v == 0.0));
        }
    }
}
