//! How the process allocator treats the forward's large buffers.
//!
//! A forward's outputs (logits are tokens x vocabulary floats: 3 MiB at 16
//! tokens of the default model) are above glibc's starting threshold for
//! taking memory straight from the kernel, so a forward could map them
//! afresh and unmap them when dropped: every page faulted in and cleared
//! again (`clear_page_erms`, 3% of a T=16 forward's profile). Setting the
//! threshold to glibc's largest value keeps freed buffers up to that size
//! in the heap for the next forward.
//!
//! Invariant: only allocation policy changes; no value computed depends on it.

use std::sync::OnceLock;

/// Buffers up to this size come from the heap and return to it: glibc's
/// largest allowed threshold on 64-bit targets (`4 MiB * sizeof(long)`);
/// logits of up to ~170 tokens of the default model fit.
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Keeps freed large buffers for reuse (glibc; nothing elsewhere). Once
/// per process; idempotent. Returns whether the allocator took the
/// settings.
pub fn keep_freed_buffers() -> bool {
    static TAKEN: OnceLock<bool> = OnceLock::new();
    *TAKEN.get_or_init(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: `mallopt` only changes the allocator's parameters.
            let taken = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1
            };
            if !taken {
                tracing::warn!("glibc did not take the large-buffer settings; forwards may fault pages in");
            }
            taken
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        false
    })
}

#[cfg(test)]
mod tests {
    /// glibc takes the threshold (a value above its limit would be refused
    /// and leave the threshold where it was).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_allocator_takes_the_settings() {
        assert!(super::keep_freed_buffers());
        assert!(super::keep_freed_buffers(), "idempotent");
    }
}
