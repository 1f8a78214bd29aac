//! Signed commands: the envelope a controller wraps a command in, the ed25519 keys that sign
//! and check it, and the agent's rule for what it accepts ([`open`]).
//!
//! The controller signs the exact bytes of the command JSON and sends them, base64, inside an
//! envelope `{"version":1,"signed":{"key_id","alg","sig","payload"}}`, so no re-serialisation
//! on either side can change what was signed. An agent with trusted keys accepts only an
//! envelope whose `key_id` names one of them and whose signature verifies over `payload`, and
//! only while the command's `created_at` is inside its replay window; an agent with none accepts
//! plain (unsigned) version 1 commands as before, and the payload of an envelope unchecked.
//!
//! Pure functions over bytes and keys: reading key files, generating seeds and logging are the
//! binaries' part. The envelope and the key formats are documented in `docs/protocol.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::shown;
use crate::{parse_versioned, Command, ProtocolError, COMMAND_VERSION};

/// The one signature algorithm, as written in `signed.alg`.
pub const ALGORITHM: &str = "ed25519";

/// How old a signed command may be when no `signature_max_age_seconds` is configured.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// How far in the future a signed command's `created_at` may be (clocks differ a little).
pub const FUTURE_SKEW: Duration = Duration::from_secs(300);

/// Why a key could not be read from its text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not standard base64.
    #[error("not base64 ({0}); a pier key is the base64 of 32 bytes on one line")]
    NotBase64(String),
    /// The decoded key is not 32 bytes.
    #[error("decodes to {0} bytes; a pier ed25519 key is 32 bytes")]
    Length(usize),
    /// 32 bytes that are not an ed25519 public key.
    #[error("is not a valid ed25519 public key")]
    NotAPoint,
}

fn decode_32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| KeyError::NotBase64(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A signing key (the controller's). Its text form is the base64 of its 32-byte seed; it is
/// never shown by `Debug`, and the seed is wiped from memory when the key is dropped.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// The key whose seed is `seed` (32 random bytes make a new key).
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// Reads the text form: base64 of the 32-byte seed, surrounding whitespace ignored.
    pub fn from_base64(text: &str) -> Result<SecretKey, KeyError> {
        Ok(SecretKey::from_seed(&decode_32(text)?))
    }

    /// The text form (base64 of the seed), for a key file.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(key_id {})", self.public_key().key_id())
    }
}

/// A public key an agent trusts. Its text form is the base64 of its 32 bytes.
#[derive(Clone, Copy)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Reads the text form: base64 of the 32-byte key, surrounding whitespace ignored.
    pub fn from_base64(text: &str) -> Result<PublicKey, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(&decode_32(text)?)
            .map(PublicKey)
            .map_err(|_| KeyError::NotAPoint)
    }

    /// The text form, for a `.pub` file or `trusted_keys[].public_key`.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_bytes())
    }

    /// The key's id: the first 16 hex digits of the SHA-256 of its 32 bytes. It names the key
    /// in `signed.key_id`, in `trusted_keys[].id` and in logs.
    pub fn key_id(&self) -> String {
        Sha256::digest(self.0.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// What an agent accepts: its trusted keys (none: it runs open) and its replay window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignaturePolicy {
    trusted: BTreeMap<String, PublicKey>,
    /// How old (by its `created_at`) a signed command may be.
    pub max_age: Duration,
}

impl Default for SignaturePolicy {
    fn default() -> SignaturePolicy {
        SignaturePolicy {
            trusted: BTreeMap::new(),
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

impl SignaturePolicy {
    /// Trusts `key` too (several keys make a rotation possible). Returns false when it was
    /// already trusted.
    pub fn trust(&mut self, key: PublicKey) -> bool {
        self.trusted.insert(key.key_id(), key).is_none()
    }

    /// True when no key is trusted: every command is accepted, signed or not.
    pub fn is_open(&self) -> bool {
        self.trusted.is_empty()
    }

    /// The trusted keys' ids, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        self.trusted.keys().cloned().collect()
    }
}

/// The envelope of a signed command, as it travels (the whole queue message or spool file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// Protocol version; always [`COMMAND_VERSION`].
    pub version: u32,
    /// The signature and what it covers.
    pub signed: Signed,
}

/// A signature over exact bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The signing key's id ([`PublicKey::key_id`]).
    pub key_id: String,
    /// Always [`ALGORITHM`].
    pub alg: String,
    /// Base64 of the 64-byte ed25519 signature over the bytes of `payload`.
    pub sig: String,
    /// Base64 of the command JSON exactly as signed.
    pub payload: String,
}

/// Signs `command_json` (the bytes of a command, e.g. [`Command::to_json`]) with `key` and
/// returns the envelope to send, as compact JSON.
pub fn sign(command_json: &[u8], key: &SecretKey) -> Vec<u8> {
    let envelope = SignedEnvelope {
        version: COMMAND_VERSION,
        signed: Signed {
            key_id: key.public_key().key_id(),
            alg: ALGORITHM.to_string(),
            sig: B64.encode(key.0.sign(command_json).to_bytes()),
            payload: B64.encode(command_json),
        },
    };
    serde_json::to_vec(&envelope).expect("an envelope always serialises")
}

/// How a command that [`open`] accepted was vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A plain command, accepted because the agent runs open.
    Unsigned,
    /// An envelope whose signature was not checked, because the agent runs open.
    Unchecked {
        /// The key the envelope claims.
        key_id: String,
    },
    /// An envelope whose signature verified with this trusted key.
    Verified {
        /// The trusted key's id.
        key_id: String,
    },
}

/// A command [`open`] accepted, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// The command.
    pub command: Command,
    /// Whether and by whom it was signed.
    pub origin: Origin,
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// Not a command (or envelope) at all: malformed JSON, version, or field.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A plain command to an agent that trusts only signed ones.
    #[error(
        "command is not signed, and this agent accepts only commands signed by one of its \
         trusted_keys ({trusted}); send it with `pier deploy --signing-key`"
    )]
    Unsigned {
        /// The trusted key ids, comma-separated.
        trusted: String,
    },
    /// `signed.alg` is not `ed25519`.
    #[error("field `signed.alg`: `{0}` is not supported; pier signs with `ed25519`")]
    Algorithm(String),
    /// `signed.key_id` names no trusted key.
    #[error(
        "signed by key `{key_id}`, which this agent does not trust (trusted: {trusted}); add \
         its public key to trusted_keys, or sign with a trusted key"
    )]
    UnknownKey {
        /// The envelope's key id (at most 64 characters shown).
        key_id: String,
        /// The trusted key ids, comma-separated.
        trusted: String,
    },
    /// The signature does not verify over the payload with the named key.
    #[error(
        "signature by key `{key_id}` does not verify: the command was altered after signing, \
         or signed with another key"
    )]
    BadSignature {
        /// The trusted key the envelope named.
        key_id: String,
    },
    /// The command is older than the replay window.
    #[error(
        "command {deployment_id} was created at {created_at}, {age_seconds}s ago, past this \
         agent's signature_max_age_seconds ({max_age_seconds}); a replayed or stale command \
         is refused: start a new deployment"
    )]
    Expired {
        /// The command's deployment id.
        deployment_id: String,
        /// Its `created_at`.
        created_at: DateTime<Utc>,
        /// How old it is.
        age_seconds: i64,
        /// The window.
        max_age_seconds: u64,
    },
    /// The command was created further in the future than clock skew explains.
    #[error(
        "command {deployment_id} was created at {created_at}, {ahead_seconds}s in the future, \
         past the {skew_seconds}s allowed for clock skew; check the controller's clock"
    )]
    FromTheFuture {
        /// The command's deployment id.
        deployment_id: String,
        /// Its `created_at`.
        created_at: DateTime<Utc>,
        /// How far ahead of this host's clock.
        ahead_seconds: i64,
        /// [`FUTURE_SKEW`] in seconds.
        skew_seconds: u64,
    },
}

/// Turns a queue message into a command, or says why not. `body` is a plain command (accepted
/// only when `policy` trusts no key) or a [`SignedEnvelope`]: with trusted keys, its key must be
/// one of them and its signature must verify over the payload's exact bytes. Without trusted
/// keys the envelope's payload is taken unchecked.
///
/// The replay window is the caller's second step, [`check_fresh`], taken when a host first
/// meets a deployment id: a redelivery of one it already took is the dedupe store's business,
/// however old.
pub fn open(body: &[u8], policy: &SignaturePolicy) -> Result<Opened, SignatureError> {
    if !is_envelope(body) {
        if !policy.is_open() {
            return Err(SignatureError::Unsigned {
                trusted: policy.key_ids().join(", "),
            });
        }
        return Ok(Opened {
            command: Command::from_json(body)?,
            origin: Origin::Unsigned,
        });
    }
    let envelope: SignedEnvelope = parse_versioned(body, COMMAND_VERSION)?;
    let s = envelope.signed;
    let payload = B64
        .decode(s.payload.trim())
        .map_err(|e| ProtocolError::field("signed.payload", format!("not base64 ({e})")))?;
    if policy.is_open() {
        return Ok(Opened {
            command: Command::from_json(&payload)?,
            origin: Origin::Unchecked {
                key_id: shown(&s.key_id),
            },
        });
    }
    if s.alg != ALGORITHM {
        return Err(SignatureError::Algorithm(shown(&s.alg)));
    }
    let Some(key) = policy.trusted.get(&s.key_id) else {
        return Err(SignatureError::UnknownKey {
            key_id: shown(&s.key_id),
            trusted: policy.key_ids().join(", "),
        });
    };
    let sig = B64
        .decode(s.sig.trim())
        .map_err(|e| ProtocolError::field("signed.sig", format!("not base64 ({e})")))?;
    let sig = <[u8; 64]>::try_from(sig.as_slice()).map_err(|_| {
        ProtocolError::field(
            "signed.sig",
            format!("decodes to {} bytes; an ed25519 signature is 64", sig.len()),
        )
    })?;
    key.0
        .verify_strict(&payload, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::BadSignature {
            key_id: s.key_id.clone(),
        })?;
    let command = Command::from_json(&payload)?;
    Ok(Opened {
        command,
        origin: Origin::Verified { key_id: s.key_id },
    })
}

/// An envelope is a JSON object with a `signed` member; anything else is read as a plain
/// command (and refused as such, with the command parser's reason, when it is not one).
fn is_envelope(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        signed: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(body).is_ok_and(|p| p.signed.is_some())
}

/// The replay window: a verified command's `created_at` must lie within `policy.max_age`
/// before `now` and [`FUTURE_SKEW`] after it. A command an open agent accepted has no window
/// (nothing vouches for its `created_at`), so this passes it.
pub fn check_fresh(
    opened: &Opened,
    policy: &SignaturePolicy,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    if !matches!(opened.origin, Origin::Verified { .. }) {
        return Ok(());
    }
    let cmd = &opened.command;
    let max_age = policy.max_age;
    let age = now.signed_duration_since(cmd.created_at);
    let max = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let skew = chrono::Duration::from_std(FUTURE_SKEW).expect("five minutes fit");
    if age > max {
        return Err(SignatureError::Expired {
            deployment_id: cmd.deployment_id.clone(),
            created_at: cmd.created_at,
            age_seconds: age.num_seconds(),
            max_age_seconds: max_age.as_secs(),
        });
    }
    if -age > skew {
        return Err(SignatureError::FromTheFuture {
            deployment_id: cmd.deployment_id.clone(),
            created_at: cmd.created_at,
            ahead_seconds: (-age).num_seconds(),
            skew_seconds: FUTURE_SKEW.as_secs(),
        });
    }
    Ok(())
}
