//! The `modelc` binary's allocator: the system's, asking Linux to back
//! large blocks with transparent huge pages; and `populate`, which faults
//! a buffer's pages in at once.
//!
//! Decoding reads every weight once per token, hundreds of megabytes in
//! 4 KiB pages: a TLB miss and a page walk every 4 KiB of every stream.
//! Most distributions ship transparent huge pages as `madvise` (only for
//! memory that asks), so a block asks for them before anything touches it:
//! the kernel then faults its 2 MiB-aligned interior in 2 MiB pages.
//! Measured in `docs/cpu.md` (stories110M decoding). The commands that run
//! a trained model ask for them (`enable`); training does not: its step
//! was no faster with them, and aligning its blocks alone raised its peak
//! memory ~5% (stories15M, 670 -> 705 MiB), which `train --memory-budget`
//! counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether large blocks are advised to take huge pages.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Asks for huge pages for the large blocks allocated from now on.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// The system allocator; once `enable`d, blocks of 2 MiB and more are
/// advised to take huge pages, and those not asked to be zeroed (f32
/// weights, filled as they are made) start on a huge page: a weight of 2.25 MiB
/// (768 x 768 f32) then has one whole huge page, where at a chance offset
/// it would have had none most of the time.
pub struct HugePages;

/// A huge page's size (x86-64 and most aarch64 kernels).
const HUGE: usize = 2 << 20;

/// Whether a block of `size` bytes is allocated on huge pages.
fn huge(size: usize) -> bool {
    cfg!(target_os = "linux") && size >= HUGE && ENABLED.load(Ordering::Relaxed)
}

// SAFETY: on Linux, every block comes from the C allocator (as `System`'s
// do on Unix: malloc, or posix_memalign for larger alignments) and goes back
// through `free`, whichever way it was aligned; elsewhere `System` does it
// all. The advice only changes how the kernel backs pages.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !huge(layout.size()) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { System.alloc(layout) };
        }
        let p = aligned(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if huge(layout.size()) {
            // Not aligned: calloc leaves a fresh mapping untouched (it is
            // zero already) until it is used, so a large cache or arena
            // takes memory as it fills, and the advice still comes before
            // the first touch. (Writing the zeros into an aligned block
            // would commit all of it at once.)
            advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        // SAFETY: a block of the C allocator (above).
        unsafe {
            let _ = layout;
            libc::free(p as *mut libc::c_void)
        }
        #[cfg(not(target_os = "linux"))]
        // SAFETY: as `alloc`.
        unsafe {
            System.dealloc(p, layout)
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        if !huge(size) {
            // SAFETY: as `alloc` (the C allocator's realloc takes any of its
            // blocks; `System` keeps the alignment).
            return unsafe { System.realloc(p, layout, size) };
        }
        // SAFETY: the caller's contract: `size` with `layout`'s alignment is
        // a valid layout; the old block holds `layout.size()` bytes.
        unsafe {
            let q = self.alloc(Layout::from_size_align_unchecked(size, layout.align()));
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, layout.size().min(size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

/// Faults in the pages of `data` now, in one call, where its first writes
/// would otherwise fault each 4 KiB page on its own (a training run's
/// AdamW moments: zeros that calloc leaves untouched until the first step
/// writes them). Linux 5.14 and later; elsewhere, or where the kernel
/// refuses, the pages come as they are first touched, as before.
pub fn populate<T>(data: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let p = data.as_mut_ptr() as usize;
        let (start, end) = (p.next_multiple_of(PAGE), (p + std::mem::size_of_val(data)) / PAGE * PAGE);
        if end > start {
            // SAFETY: whole pages inside `data`; populating writes nothing
            // the program sees (anonymous pages are zero either way, and
            // pages already present are left as they are).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// A block for `layout` from the C allocator, starting on a huge page.
#[cfg(target_os = "linux")]
fn aligned(layout: Layout) -> *mut u8 {
    let mut p = std::ptr::null_mut();
    // SAFETY: `p` is written by posix_memalign; the alignment is a power of
    // two and a multiple of the pointer's size.
    if unsafe { libc::posix_memalign(&mut p, layout.align().max(HUGE), layout.size()) } != 0 {
        return std::ptr::null_mut();
    }
    p as *mut u8
}

#[cfg(not(target_os = "linux"))]
fn aligned(_: Layout) -> *mut u8 {
    unreachable!("bug: huge pages are only asked for on Linux")
}

/// Asks for huge pages over the 2 MiB-aligned part of `len` bytes at `p`.
#[cfg(target_os = "linux")]
fn advise(p: *mut u8, len: usize) {
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize).saturating_add(len) / HUGE * HUGE;
    if end > start {
        // SAFETY: a range inside a block just allocated; advice never
        // changes its contents. A kernel without huge pages says no,
        // which changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_: *mut u8, _: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `data` in memory (`mincore`), of its whole pages.
    #[cfg(target_os = "linux")]
    fn resident(data: &[f32]) -> (usize, usize) {
        let p = data.as_ptr() as usize;
        let (start, end) = (p.next_multiple_of(4096), (p + std::mem::size_of_val(data)) / 4096 * 4096);
        let mut present = vec![0u8; (end - start) / 4096];
        // SAFETY: whole pages of a live block; one byte a page out.
        assert_eq!(unsafe { libc::mincore(start as *mut libc::c_void, end - start, present.as_mut_ptr()) }, 0);
        (present.iter().filter(|b| **b & 1 == 1).count(), present.len())
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn populated_zeros_are_in_memory_and_still_zeros() {
        // 64 MiB of calloc's zeros: a fresh mapping nothing has touched.
        let mut zeros = vec![0f32; 16 << 20];
        let (before, pages) = resident(&zeros);
        assert!(before < pages / 2, "{before} of {pages} pages in memory before");
        populate(&mut zeros);
        assert_eq!(resident(&zeros), (pages, pages));
        assert!(zeros.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn large_blocks_start_on_a_huge_page_and_keep_their_bytes_and_zeros() {
        let a = HugePages;
        enable();
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
            assert_eq!(z as usize % 64, 0);
            assert!((0..zeroed.size()).all(|i| *z.add(i) == 0));
            a.dealloc(z, zeroed);
        }
    }
}
