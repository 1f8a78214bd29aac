//! pier-engine's integration tests: its public API (bundle unpacking, the hook runner,
//! install plan + apply) on real files, processes and users in scratch directories. Tests of
//! the binaries live in `tests/e2e`.

mod support;

mod archive_caps;
mod bundle;
mod confined;
mod hooks;
mod incremental;
mod install;
