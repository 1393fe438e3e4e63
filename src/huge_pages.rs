//! A global allocator that backs large allocations with transparent huge
//! pages, for processes that stream gigabytes of weights per token.
//!
//! A decode step reads every weight once; with 4 KiB pages that is one TLB
//! miss per 4 KiB, and under a hypervisor each miss is a two-level page walk.
//! On the 2-core KVM machines here a plain read of 1 GiB runs 16–19 GB/s on
//! 4 KiB pages and 20–23 GB/s on 2 MiB pages (BENCHMARKS.md). Linux hands
//! out huge pages to anonymous memory only where `madvise(MADV_HUGEPAGE)`
//! asked for them when the kernel's policy is `madvise` (the common
//! default), and the advice must come before the memory is first touched,
//! i.e. inside the allocator: candle fills a weight's buffer as it allocates
//! it.
//!
//! Opt in from a binary:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: candle_moe::HugePageAlloc = candle_moe::HugePageAlloc;
//! ```
//!
//! Elsewhere than Linux it is the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations from this size get the advice (a weight matrix; activations
/// of a decode step stay on the plain path).
pub const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// The system allocator, with `MADV_HUGEPAGE` on the 2 MiB-aligned inside of
/// every allocation of at least [`HUGE_PAGE_MIN_BYTES`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HugePageAlloc;

const HUGE: usize = 2 << 20;

/// Advises the whole 2 MiB pages inside `[p, p + len)`. The advice changes
/// how pages are backed, never their contents, and a failure (a kernel
/// without THP) leaves the memory as it was.
#[cfg(target_os = "linux")]
fn advise(p: *mut u8, len: usize) {
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize).saturating_add(len) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside an allocation the caller owns;
        // MADV_HUGEPAGE does not read, write or unmap it.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_: *mut u8, _: usize) {}

// SAFETY: every call is forwarded to `System` with the same layout; the
// advice only changes page backing of memory `System` just returned.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() && layout.size() >= HUGE_PAGE_MIN_BYTES {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() && layout.size() >= HUGE_PAGE_MIN_BYTES {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout)
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() && new_size >= HUGE_PAGE_MIN_BYTES {
            advise(q, new_size);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory from the allocator behaves as memory: written, read back,
    /// grown and freed, small and large, zeroed where asked.
    #[test]
    fn allocates_like_the_system() {
        let a = HugePageAlloc;
        for size in [16, 4096, HUGE_PAGE_MIN_BYTES, 3 * HUGE + 17] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                assert!(!p.is_null());
                std::ptr::write_bytes(p, 0xab, size);
                let q = a.realloc(p, layout, 2 * size);
                assert!(!q.is_null());
                assert!(std::slice::from_raw_parts(q, size)
                    .iter()
                    .all(|&b| b == 0xab));
                a.dealloc(q, Layout::from_size_align(2 * size, 64).unwrap());
            }
        }
    }
}
