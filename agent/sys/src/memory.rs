//! How much of the allocator's memory a long-running process keeps. glibc's malloc gives
//! each thread that allocates an arena of its own (up to eight per CPU) and keeps what is
//! freed in them for reuse; a daemon that deploys now and then and waits the rest of the
//! time would carry every arena its busiest moment made. [`limit_arenas`] caps their number
//! at start; [`release_free_memory`] hands freed memory back to the kernel once a burst of
//! work is over. Elsewhere than glibc (musl, other allocators) both do nothing.
//!
//! Both are C calls, so `unsafe`: the workspace denies `unsafe_code`, and this module allows
//! it for those two calls alone.

/// Caps glibc's malloc arenas at `n` (at least 1), like `MALLOC_ARENA_MAX=n` in the
/// environment; an explicit `MALLOC_ARENA_MAX` wins. Call it early, before other threads
/// start.
pub fn limit_arenas(n: usize) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let n = i32::try_from(n.max(1)).unwrap_or(i32::MAX);
    imp::set_arena_max(n);
}

/// Returns the free memory of every arena to the kernel (`malloc_trim(0)`): for after a
/// deployment, when the heap the work needed is free again.
pub fn release_free_memory() {
    imp::trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub(super) fn set_arena_max(n: i32) {
        // SAFETY: mallopt only sets a tunable of the allocator; M_ARENA_MAX takes any
        // positive count, and glibc serialises changes to its parameters itself.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }

    pub(super) fn trim() {
        // SAFETY: malloc_trim takes the arenas' locks itself and only releases memory that
        // no allocation holds; it has no precondition on the caller.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn set_arena_max(_n: i32) {}
    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_calls_are_harmless_at_any_time() {
        super::limit_arenas(2);
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![0u8; 1024 + i]).collect();
        drop(v);
        super::release_free_memory();
        super::limit_arenas(0);
    }
}
