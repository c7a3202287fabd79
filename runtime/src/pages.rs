//! The `modelc` binary's allocator: the system's, asking Linux to back
//! large blocks with transparent huge pages.
//!
//! Decoding reads every weight once per token, hundreds of megabytes in
//! 4 KiB pages: a TLB miss and a page walk every 4 KiB of every stream.
//! Most distributions ship transparent huge pages as `madvise` (only for
//! memory that asks), so a block asks for them before anything touches it:
//! the kernel then faults its 2 MiB-aligned interior in 2 MiB pages.
//! Measured in `docs/cpu.md` (stories110M decoding).

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with blocks of 2 MiB and more aligned to 2 MiB
/// and backed by huge pages.
pub struct HugePages;

/// A huge page's size (x86-64 and most aarch64 kernels).
const HUGE: usize = 2 << 20;

/// The layout a block is allocated with: a large one starts on a huge
/// page, so that a weight of 2.25 MiB (768 x 768 f32) has one whole huge
/// page, where at a chance offset it would have had none most of the time.
fn widened(layout: Layout) -> Layout {
    if layout.size() >= HUGE {
        Layout::from_size_align(layout.size(), layout.align().max(HUGE)).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block comes from `System` with `widened(layout)` and
// returns to it with the same; the advice only changes how the kernel
// backs pages.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on (a widened layout is as valid).
        let p = unsafe { System.alloc(widened(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < HUGE {
            // SAFETY: as `alloc`.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // Advised before the zeros are written, or the writes fault the
        // block in small pages. SAFETY: as `alloc`; `size` bytes at `p`.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(p, widened(layout)) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        if layout.size() < HUGE && size < HUGE {
            // SAFETY: as `alloc`; neither layout is widened.
            return unsafe { System.realloc(p, layout, size) };
        }
        // SAFETY: the caller's contract: `size` with `layout`'s alignment is
        // a valid layout; the old block holds `layout.size()` bytes.
        unsafe {
            let new = Layout::from_size_align_unchecked(size, layout.align());
            let q = self.alloc(new);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, layout.size().min(size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

/// Asks for huge pages over the 2 MiB-aligned part of `len` bytes at `p`.
#[cfg(target_os = "linux")]
fn advise(p: *mut u8, len: usize) {
    if len >= HUGE && !p.is_null() {
        let start = (p as usize).next_multiple_of(HUGE);
        let end = (p as usize).saturating_add(len) / HUGE * HUGE;
        if end > start {
            // SAFETY: a range inside a block just allocated; advice never
            // changes its contents. A kernel without huge pages says no,
            // which changes nothing.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_: *mut u8, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_huge_page_and_keep_their_bytes() {
        let a = HugePages;
        // SAFETY: blocks allocated, used within their sizes and freed with their layouts.
        unsafe {
            let small = Layout::from_size_align(HUGE - 1, 8).unwrap();
            let p = a.alloc(small);
            p.write_bytes(7, small.size());
            // Grows across the threshold: the bytes move with it, onto a huge page.
            let q = a.realloc(p, small, 3 * HUGE);
            assert_eq!(q as usize % HUGE, 0);
            assert!((0..small.size()).all(|i| *q.add(i) == 7));
            q.add(small.size()).write_bytes(9, 3 * HUGE - small.size());
            // Shrinks back below it.
            let large = Layout::from_size_align(3 * HUGE, 8).unwrap();
            let r = a.realloc(q, large, 100);
            assert!((0..100).all(|i| *r.add(i) == 7));
            a.dealloc(r, Layout::from_size_align(100, 8).unwrap());

            let zeroed = Layout::from_size_align(HUGE + 12_345, 64).unwrap();
            let z = a.alloc_zeroed(zeroed);
            assert_eq!(z as usize % HUGE, 0);
            assert!((0..zeroed.size()).all(|i| *z.add(i) == 0));
            a.dealloc(z, zeroed);
        }
    }
}
