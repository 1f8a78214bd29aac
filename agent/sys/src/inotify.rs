//! An inotify instance that a tokio task can wait on: the kernel, not a timer, wakes it when
//! a watched directory changes. What the events mean is the caller's business (the spool's
//! `dirwatch` in pier-transport); this module only owns the descriptor and its place in the
//! reactor.
//!
//! Registering a descriptor with tokio's reactor (`AsyncFd::register`) is `unsafe`: the
//! caller promises that the descriptor stays open and the same for as long as it is
//! registered. Here that holds by construction, which is why this small type, and not its
//! users, carries the `#[allow(unsafe_code)]`.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// A non-blocking inotify instance registered with the current tokio runtime.
#[derive(Debug)]
pub struct AsyncInotify {
    fd: AsyncFd<Instance>,
}

/// The instance, owned: its descriptor is opened once, never replaced, closed on drop.
#[derive(Debug)]
struct Instance(Inotify);

impl AsRawFd for Instance {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl AsyncInotify {
    /// A new instance (close-on-exec, non-blocking), registered with the reactor of the
    /// current runtime. Fails where inotify is unavailable (no kernel support, the user's
    /// limit of instances reached); panics outside a tokio runtime with I/O enabled.
    pub fn new() -> std::io::Result<AsyncInotify> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        #[allow(unsafe_code)]
        // SAFETY: `Instance` owns the inotify descriptor (an `OwnedFd` inside `Inotify`),
        // which nothing can close or replace while it is owned, and `as_raw_fd` always
        // returns that one descriptor; the `AsyncFd` owns the `Instance` for its whole
        // registration and deregisters it before the descriptor is closed on drop.
        let fd = unsafe { AsyncFd::register(Instance(inotify)) }.map_err(std::io::Error::from)?;
        Ok(AsyncInotify { fd })
    }

    /// Watches `path` for the events in `mask` (`inotify_add_watch`).
    pub fn add_watch(
        &self,
        path: &std::path::Path,
        mask: AddWatchFlags,
    ) -> std::io::Result<WatchDescriptor> {
        Ok(self.fd.get_ref().0.add_watch(path, mask)?)
    }

    /// The events queued now, without waiting (none: an empty list).
    pub fn read_now(&self) -> std::io::Result<Vec<InotifyEvent>> {
        match self.fd.get_ref().0.read_events() {
            Ok(events) => Ok(events),
            Err(nix::errno::Errno::EAGAIN) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until events are queued and returns them.
    pub async fn read(&self) -> std::io::Result<Vec<InotifyEvent>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(result) => return result,
                // The readiness was stale: `try_io` cleared it; wait again.
                Err(_would_block) => {}
            }
        }
    }
}
