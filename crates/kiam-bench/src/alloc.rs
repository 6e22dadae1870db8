//! A counting allocator for heap-per-pod figures. It counts nothing unless
//! [`enable`] is called first thing in `main`: the latency benchmarks run in
//! processes that never enable it, so they pay one predictable branch per
//! allocation and no shared counter that two cores would fight over.
//! Threads marked with [`track_this_thread`] (and only those) also count
//! into a second counter, for one runtime's heap in a shared process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Live bytes of the threads marked with [`track_this_thread`].
static TRACKED: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    // const: no lazy initialisation (which could allocate) inside the allocator.
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

/// Bytes a marked thread allocates (or frees) change [`tracked_live`], e.g.
/// the kiam servers' runtime in an in-process figure (`on_thread_start`).
/// Memory allocated on one thread and freed on another makes the figure
/// approximate; the servers' caches live and die on their own threads.
pub fn track_this_thread() {
    TRACK.with(|t| t.set(true));
}

/// Live bytes allocated by marked threads (see [`track_this_thread`]).
pub fn tracked_live() -> isize {
    TRACKED.load(Ordering::Relaxed)
}

fn tracked(delta: isize) {
    if TRACK.try_with(Cell::get).unwrap_or(false) {
        TRACKED.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The system allocator (what `kiam` itself uses), plus live-byte counting.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counter is
// only arithmetic on the sizes the caller passed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            tracked(layout.size() as isize);
        }
        if !p.is_null() && ENABLED.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            tracked(layout.size() as isize);
        }
        if !p.is_null() && ENABLED.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        tracked(-(layout.size() as isize));
        if ENABLED.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            tracked(new_size as isize - layout.size() as isize);
        }
        if !p.is_null() && ENABLED.load(Ordering::Relaxed) {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Starts counting. Call before anything allocates that will be freed later,
/// or the count drifts negative by what was allocated uncounted.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Bytes requested and not yet freed since [`enable`].
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}
