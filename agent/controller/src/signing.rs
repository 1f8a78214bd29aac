//! The controller's signing keys: `pier keygen` writes a key pair, `pier deploy
//! --signing-key FILE` (or `PIER_SIGNING_KEY`) reads the secret half and signs each command
//! with it ([`pier_protocol::signature::sign`]).
//!
//! A key pair is two one-line files: `NAME.key`, the base64 of the 32-byte ed25519 seed, mode
//! 0600 (a secret key file that others may read is refused, as ssh does), and `NAME.pub`, the
//! base64 of the 32-byte public key, which agents list in `trusted_keys`. The formats are
//! documented in `docs/protocol.md`, distribution and rotation in `docs/operations.md`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pier_protocol::signature::SecretKey;

use crate::ControllerError;

/// The longest key file read (a key is 45 bytes of text).
const MAX_KEY_FILE: u64 = 4096;

/// What `pier keygen` wrote.
#[derive(Debug)]
pub struct Generated {
    /// The secret key file (mode 0600).
    pub secret: PathBuf,
    /// The public key file (mode 0644).
    pub public: PathBuf,
    /// The key's id, as agents and logs name it.
    pub key_id: String,
    /// The public key's text form, for `trusted_keys[].public_key`.
    pub public_key: String,
}

/// Writes a new key pair `DIR/NAME.key` and `DIR/NAME.pub`, refusing to replace either.
/// `DIR` is created (mode 0700) when missing.
pub fn keygen(dir: &Path, name: &str) -> Result<Generated, ControllerError> {
    pier_protocol::check_id(name).map_err(|e| ControllerError::usage("--name", e.to_string()))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ControllerError::io("create", dir, e))?;
    }
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for path in [&secret, &public] {
        if path.symlink_metadata().is_ok() {
            return Err(ControllerError::usage(
                "--out",
                format!(
                    "{} already exists; pier keygen never replaces a key (choose another --name \
                     or directory)",
                    path.display()
                ),
            ));
        }
    }
    // The seed straight from the kernel (getrandom), not from a user-space generator.
    let mut seed = [0u8; 32];
    rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut seed).map_err(|e| {
        ControllerError::SigningKey {
            path: secret.clone(),
            message: format!("no randomness from the operating system: {e}"),
        }
    })?;
    let key = SecretKey::from_seed(&seed);
    let pubkey = key.public_key();
    write_new(&secret, 0o600, &key.to_base64())?;
    if let Err(e) = write_new(&public, 0o644, &pubkey.to_base64()) {
        let _ = std::fs::remove_file(&secret);
        return Err(e);
    }
    Ok(Generated {
        secret,
        public,
        key_id: pubkey.key_id(),
        public_key: pubkey.to_base64(),
    })
}

/// Creates `path` (never replacing anything) with `mode`, writes `text` and a newline, syncs.
fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), ControllerError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| ControllerError::io("create", path, e))?;
    // The umask may have taken bits away from a public key; never adds any to a secret one.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| ControllerError::io("chmod", path, e))?;
    f.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| ControllerError::io("write", path, e))
}

/// Reads the secret key in `path` (`--signing-key`), refusing one that users other than its
/// owner may read or write.
pub fn load_signing_key(path: &Path) -> Result<SecretKey, ControllerError> {
    let bad = |message: String| ControllerError::SigningKey {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| ControllerError::io("read", path, e))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "has mode {mode:04o}, so other users can read the signing key; run \
             `chmod 600 {}` (and consider the key exposed)",
            path.display()
        )));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(bad(format!(
            "is {} bytes; a pier signing key file is one line of base64 (see `pier keygen`)",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ControllerError::io("read", path, e))?;
    SecretKey::from_base64(&text).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_pair_with_safe_modes_that_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys");
        let g = keygen(&out, "ci").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&g.secret), 0o600);
        assert_eq!(mode(&g.public), 0o644);
        let key = load_signing_key(&g.secret).unwrap();
        assert_eq!(key.public_key().key_id(), g.key_id);
        let public = std::fs::read_to_string(&g.public).unwrap();
        assert_eq!(public.trim(), g.public_key);
        // Never over an existing key.
        let e = keygen(&out, "ci").unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        // A readable secret key is refused, naming the file and the fix.
        std::fs::set_permissions(&g.secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_signing_key(&g.secret).unwrap_err().to_string();
        assert!(e.contains("ci.key") && e.contains("chmod 600"), "{e}");
        // Something that is not a key names the file.
        let junk = dir.path().join("junk.key");
        write_new(&junk, 0o600, "hello").unwrap();
        let e = load_signing_key(&junk).unwrap_err().to_string();
        assert!(e.contains("junk.key") && e.contains("base64"), "{e}");
    }
}
