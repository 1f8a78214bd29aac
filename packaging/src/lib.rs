//! The packaging metadata of pier (`Cargo.toml` beside this file: `[package.metadata.deb]` and
//! `[package.metadata.generate-rpm]`). There is no code here: `scripts/package.sh` builds the
//! binaries of `pier-agent` and `pier-controller` and packs them with the files of this
//! directory.
