//! Signed commands: what an agent with trusted keys accepts, and every way a message fails
//! that check (each refused with its reason, never turned into a command).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use pier_protocol::signature::{
    check_fresh, open, sign, KeyError, Origin, PublicKey, SecretKey, SignatureError,
    SignaturePolicy, FUTURE_SKEW,
};
use pier_protocol::{BundleType, Command, Revision, StatusSinkSpec, StatusTarget};

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

fn command(created_at: DateTime<Utc>) -> Command {
    Command {
        version: 1,
        deployment_id: "d-signed".into(),
        application_name: "web".into(),
        deployment_group_name: "prod".into(),
        deployment_group_id: "g-prod".into(),
        revision: Revision::Local {
            path: "/srv/bundle.tgz".into(),
            bundle_type: BundleType::Tgz,
            sha256: None,
        },
        events: None,
        file_exists_behavior: None,
        is_rollback: false,
        creator: None,
        commit_sha: None,
        ignore_application_stop_failures: false,
        status: StatusTarget {
            sink: StatusSinkSpec::Local {
                dir: "/var/lib/pier/status".into(),
            },
            notify_queue_url: None,
        },
        created_at,
    }
}

fn trusting(keys: &[&SecretKey]) -> SignaturePolicy {
    let mut p = SignaturePolicy::default();
    for k in keys {
        assert!(p.trust(k.public_key()));
    }
    p
}

fn envelope(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[test]
fn a_signed_command_round_trips_with_the_exact_bytes() {
    let now = Utc::now();
    let k = key(1);
    let bytes = command(now).to_json();
    let body = sign(&bytes, &k);
    let v = envelope(&body);
    assert_eq!(v["version"], 1);
    assert_eq!(v["signed"]["alg"], "ed25519");
    assert_eq!(v["signed"]["key_id"], k.public_key().key_id().as_str());
    assert_eq!(
        B64.decode(v["signed"]["payload"].as_str().unwrap())
            .unwrap(),
        bytes,
        "the payload is the signed bytes themselves"
    );
    let opened = open(&body, &trusting(&[&k])).unwrap();
    assert_eq!(opened.command, command(now));
    assert_eq!(
        opened.origin,
        Origin::Verified {
            key_id: k.public_key().key_id()
        }
    );
}

#[test]
fn a_tampered_payload_or_signature_is_refused() {
    let now = Utc::now();
    let k = key(1);
    let bytes = command(now).to_json();
    let policy = trusting(&[&k]);
    // The payload altered by one byte (a different application name), signature kept.
    let mut v = envelope(&sign(&bytes, &k));
    let altered = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("\"web\"", "\"wep\"");
    v["signed"]["payload"] = B64.encode(altered.as_bytes()).into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
    assert!(e.to_string().contains("does not verify"), "{e}");
    // One bit of the signature flipped.
    let mut v = envelope(&sign(&bytes, &k));
    let mut sig = B64.decode(v["signed"]["sig"].as_str().unwrap()).unwrap();
    sig[10] ^= 1;
    v["signed"]["sig"] = B64.encode(&sig).into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
    // A signature of the wrong length names its field.
    v["signed"]["sig"] = B64.encode([0u8; 10]).into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(e.to_string().contains("signed.sig"), "{e}");
}

#[test]
fn a_signature_by_an_untrusted_key_is_refused() {
    let now = Utc::now();
    let (trusted, other) = (key(1), key(2));
    let policy = trusting(&[&trusted]);
    let body = sign(&command(now).to_json(), &other);
    let e = open(&body, &policy).unwrap_err();
    let SignatureError::UnknownKey {
        key_id,
        trusted: list,
    } = &e
    else {
        panic!("expected UnknownKey, got {e}")
    };
    assert_eq!(key_id, &other.public_key().key_id());
    assert_eq!(list, &trusted.public_key().key_id());

    // The other key's signature under the trusted key's id: the key is known, the signature
    // does not verify with it.
    let mut v = envelope(&body);
    v["signed"]["key_id"] = trusted.public_key().key_id().into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");

    // An unknown key id is shown bounded, however long the sender made it.
    v["signed"]["key_id"] = "k".repeat(10_000).into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(e.to_string().len() < 400, "{e}");
}

#[test]
fn two_trusted_keys_allow_a_rotation() {
    let now = Utc::now();
    let (old, new) = (key(1), key(2));
    let during = trusting(&[&old, &new]);
    for k in [&old, &new] {
        let opened = open(&sign(&command(now).to_json(), k), &during).unwrap();
        assert_eq!(
            opened.origin,
            Origin::Verified {
                key_id: k.public_key().key_id()
            }
        );
    }
    // Once the old key is retired, what it signs is refused.
    let after = trusting(&[&new]);
    let e = open(&sign(&command(now).to_json(), &old), &after).unwrap_err();
    assert!(matches!(e, SignatureError::UnknownKey { .. }), "{e}");
}

#[test]
fn unsigned_commands_only_reach_an_open_agent() {
    let now = Utc::now();
    let bytes = command(now).to_json();
    let open_agent = SignaturePolicy::default();
    assert!(open_agent.is_open());
    let opened = open(&bytes, &open_agent).unwrap();
    assert_eq!(opened.origin, Origin::Unsigned);
    // An open agent takes a signed command's payload without checking it.
    let opened = open(&sign(&bytes, &key(9)), &open_agent).unwrap();
    assert!(matches!(opened.origin, Origin::Unchecked { .. }));

    let k = key(1);
    let e = open(&bytes, &trusting(&[&k])).unwrap_err();
    assert!(matches!(e, SignatureError::Unsigned { .. }), "{e}");
    assert!(e.to_string().contains("--signing-key"), "{e}");
    // Garbage is still refused as garbage, with the parser's reason.
    let e = open(b"not json", &open_agent).unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

#[test]
fn a_command_outside_the_replay_window_is_refused() {
    let now = Utc::now();
    let k = key(1);
    let mut policy = trusting(&[&k]);
    policy.max_age = Duration::from_secs(600);
    let at = |secs: i64| {
        sign(
            &command(now + chrono::Duration::seconds(secs)).to_json(),
            &k,
        )
    };

    let fresh = |body: Vec<u8>| check_fresh(&open(&body, &policy).unwrap(), &policy, now);
    fresh(at(-599)).unwrap();
    let e = fresh(at(-601)).unwrap_err();
    assert!(
        matches!(
            e,
            SignatureError::Expired {
                age_seconds: 601,
                max_age_seconds: 600,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("signature_max_age_seconds"), "{e}");

    let skew = FUTURE_SKEW.as_secs() as i64;
    fresh(at(skew - 1)).unwrap();
    let e = fresh(at(skew + 1)).unwrap_err();
    assert!(matches!(e, SignatureError::FromTheFuture { .. }), "{e}");

    // An open agent has nothing that vouches for created_at: no window.
    let open_agent = SignaturePolicy::default();
    let old = open(&at(-100_000), &open_agent).unwrap();
    check_fresh(&old, &open_agent, now).unwrap();
}

#[test]
fn a_malformed_envelope_names_its_field() {
    let now = Utc::now();
    let k = key(1);
    let policy = trusting(&[&k]);
    let body = sign(&command(now).to_json(), &k);
    let mut v = envelope(&body);
    v["version"] = 2.into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(e.to_string().contains("version 2"), "{e}");
    let mut v = envelope(&body);
    v["signed"]["alg"] = "rsa".into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(matches!(e, SignatureError::Algorithm(_)), "{e}");
    let mut v = envelope(&body);
    v["signed"].as_object_mut().unwrap().remove("sig");
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(e.to_string().contains("signed"), "{e}");
    let mut v = envelope(&body);
    v["signed"]["payload"] = "%%%".into();
    let e = open(v.to_string().as_bytes(), &policy).unwrap_err();
    assert!(e.to_string().contains("signed.payload"), "{e}");
}

#[test]
fn keys_have_a_text_form_and_a_stable_id() {
    let k = key(7);
    let back = SecretKey::from_base64(&format!("{}\n", k.to_base64())).unwrap();
    assert_eq!(back.public_key(), k.public_key());
    let p = PublicKey::from_base64(&k.public_key().to_base64()).unwrap();
    assert_eq!(p, k.public_key());
    let id = p.key_id();
    assert_eq!(id.len(), 16);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(id, key(8).public_key().key_id());
    assert!(
        !format!("{k:?}").contains(&k.to_base64()),
        "Debug hides the seed"
    );
    assert_eq!(
        PublicKey::from_base64(&B64.encode([1u8; 31])).unwrap_err(),
        KeyError::Length(31)
    );
    assert!(matches!(
        PublicKey::from_base64("not base64!"),
        Err(KeyError::NotBase64(_))
    ));
}
