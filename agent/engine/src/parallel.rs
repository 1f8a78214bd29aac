//! Work spread over a few scoped threads: the per-file syscalls of an install and of a
//! bundle's survey, which the kernel serves in parallel.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Most threads used (each mostly waits on the kernel: a stat, a write, an fsync).
const MAX_WORKERS: usize = 4;

/// Runs `f` on every index, on up to [`MAX_WORKERS`] scoped threads (at most one per `min_each`
/// items, so that a short list runs on the caller's thread alone); returns the results paired
/// with their index, or the first error (the other workers stop taking new work).
pub(crate) fn in_parallel<T: Send, E: Send>(
    items: &[usize],
    min_each: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<(usize, T)>, E> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS)
        .min(items.len() / min_each.max(1) + 1);
    if workers <= 1 {
        return items.iter().map(|&i| Ok((i, f(i)?))).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = items.get(k) else { break };
                        match f(i) {
                            Ok(t) => done.push((i, t)),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(items.len());
        let mut first_err = None;
        for h in handles {
            match h.join().expect("worker thread panicked") {
                Ok(done) => all.extend(done),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(all),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::in_parallel;

    #[test]
    fn every_index_once_on_threads_or_not() {
        for n in [0usize, 1, 5, 300] {
            let items: Vec<usize> = (0..n).rev().collect();
            let mut got = in_parallel(&items, 2, |i| Ok::<_, ()>(i * 3)).unwrap();
            got.sort();
            assert_eq!(got, (0..n).map(|i| (i, i * 3)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn an_error_is_returned() {
        let items: Vec<usize> = (0..500).collect();
        let r = in_parallel(&items, 1, |i| if i == 250 { Err(i) } else { Ok(i) });
        assert_eq!(r, Err(250));
    }
}
