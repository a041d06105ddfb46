//! How the process allocator treats the forward's large buffers.
//!
//! A forward's outputs (logits are tokens x vocabulary floats: 3 MiB at 16
//! tokens of the default model) are above glibc's threshold for taking
//! memory straight from the kernel, so each forward mapped them afresh and
//! unmapped them when dropped: every page faulted in and cleared again
//! (`clear_page_erms`, 3% of a T=16 forward's profile). Raising the
//! threshold keeps freed buffers in the heap for the next forward.
//!
//! Invariant: only allocation policy changes; no value computed depends on it.

use std::sync::Once;

/// Buffers up to this size come from the heap and return to it.
const MMAP_THRESHOLD: libc::c_int = 256 << 20;

/// Keeps freed large buffers for reuse (glibc; nothing elsewhere). Once
/// per process; idempotent.
pub fn keep_freed_buffers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `mallopt` only changes the allocator's parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD);
        }
    });
}
