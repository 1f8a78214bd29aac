//! One copy buffer per thread, for the loops that read a file in chunks (copy, hash, extract):
//! a fresh zeroed buffer per file is an allocation the size of the mmap threshold, its zeroing
//! and its page faults, ten thousand times over for a tree of small files.

use std::cell::RefCell;

/// Size of the buffer: large enough that a big file costs few reads.
pub(crate) const SIZE: usize = 128 * 1024;

thread_local! {
    static BUFFER: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's buffer ([`SIZE`] bytes, contents left from earlier use). A
/// nested call, or one during the thread's teardown, gets a buffer of its own.
pub(crate) fn with<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let taken = BUFFER
        .try_with(|b| b.try_borrow_mut().ok().map(|mut b| b.take()))
        .ok()
        .flatten()
        .flatten();
    let mut buf = taken.unwrap_or_else(|| vec![0u8; SIZE].into_boxed_slice());
    let out = f(&mut buf);
    let _ = BUFFER.try_with(|b| {
        if let Ok(mut slot) = b.try_borrow_mut() {
            *slot = Some(buf);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_buffer_is_reused_and_a_nested_call_gets_its_own() {
        let first = super::with(|b| {
            b[0] = 7;
            b.as_ptr() as usize
        });
        let (again, inner) = super::with(|b| {
            assert_eq!(b[0], 7, "the same buffer, contents kept");
            let inner = super::with(|n| {
                assert_eq!(n.len(), super::SIZE);
                n.as_ptr() as usize
            });
            (b.as_ptr() as usize, inner)
        });
        assert_eq!(first, again);
        assert_ne!(again, inner);
    }
}
