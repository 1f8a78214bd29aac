//! End-to-end tests: each module drives the real `pier-agent` / `pier` binaries against real
//! files, processes, users and (for the queue transports) a moto server on 127.0.0.1.

mod support;

mod archive_caps;
mod confine;
mod controller;
mod daemon;
mod dashboard;
mod deploy_local;
mod diagnostics;
mod fault_proxy;
mod fleet;
mod history;
mod hook_processes;
mod ignore_stop;
mod install_atomic;
mod registry;
mod signing;
mod validate;
