//! Whatever bytes arrive as a command, the parser returns (never panics) and its error stays
//! short: a hostile message cannot make the agent's log line or the dead-letter reason grow
//! with it.

use pier_protocol::Command;
use proptest::prelude::*;

/// The longest error accepted: the field path and the reason are each cut.
const MAX_ERROR_LEN: usize = 1024;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[track_caller]
fn parse_bounded(bytes: &[u8]) {
    if let Err(e) = Command::from_json(bytes) {
        let msg = e.to_string();
        assert!(msg.len() < MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
    }
}

/// A command-shaped JSON object whose values are chosen by the strategy.
fn command_like() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        "[a-z0-9._-]{0,20}",
        any::<String>(),
        "[a-z]{1,3}".prop_map(|s| s.repeat(5000)),
    ];
    (
        prop_oneof![
            Just("1".to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            text.clone().prop_map(|t| format!("{t:?}"))
        ],
        text.clone(),
        text.clone(),
        text.clone(),
        text,
    )
        .prop_map(|(version, id, app, kind, key)| {
            serde_json::json!({
                "version": serde_json::from_str::<serde_json::Value>(&version).unwrap_or_default(),
                "deployment_id": id,
                "application_name": app,
                "deployment_group_name": "g",
                "deployment_group_id": "g",
                "revision": {"type": kind, "bucket": "b", "key": key, "sha256": "00"},
                "events": [key],
                "file_exists_behavior": id,
                "status": {"sink": {"type": "local", "dir": "/tmp"}},
                "created_at": "2026-01-01T00:00:00Z",
                key: id,
            })
            .to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        parse_bounded(&bytes);
    }

    #[test]
    fn arbitrary_commands_never_panic_and_errors_stay_short(json in command_like()) {
        parse_bounded(json.as_bytes());
    }
}

#[test]
fn a_huge_unknown_value_is_cut_in_the_error() {
    let big = "x".repeat(1 << 20);
    let json = format!(r#"{{"version": 1, "deployment_id": "{big}"}}"#);
    let err = Command::from_json(json.as_bytes()).unwrap_err().to_string();
    assert!(err.len() < MAX_ERROR_LEN, "{} bytes", err.len());
    let json = format!(r#"{{"version": "{big}"}}"#);
    let err = Command::from_json(json.as_bytes()).unwrap_err().to_string();
    assert!(err.len() < MAX_ERROR_LEN, "{} bytes", err.len());
    assert!(err.contains('…'), "{err}");
}
