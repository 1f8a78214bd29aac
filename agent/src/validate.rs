//! The `pier-agent validate` command (not yet written).

use std::path::PathBuf;

/// How findings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What `pier-agent validate` was asked to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// An appspec file, a bundle directory, or a bundle archive.
    pub path: PathBuf,
    /// `-A NAME`: the AppSpec file name inside a bundle.
    pub appspec_filename: Option<String>,
    pub format: Format,
}

/// Runs the command; returns the process exit code (0 valid, 1 invalid, 2 usage).
pub fn run(_opts: &Options) -> i32 {
    eprintln!("validate: not yet built");
    2
}
