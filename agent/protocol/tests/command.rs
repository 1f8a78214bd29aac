//! A deployment command on the wire: versioned, and refused with the field named when it is
//! malformed.

use std::path::Path;

use pier_protocol::{BundleType, Command, ProtocolError, Revision, StatusSinkSpec, StatusTarget};

fn command(id: &str, revision: Revision, status_dir: &Path) -> Command {
    Command {
        version: 1,
        deployment_id: id.into(),
        application_name: "web".into(),
        deployment_group_name: "prod".into(),
        deployment_group_id: "g-prod".into(),
        revision,
        events: None,
        file_exists_behavior: None,
        is_rollback: false,
        creator: Some("tests".into()),
        commit_sha: Some("0123456789abcdef".into()),
        ignore_application_stop_failures: false,
        status: StatusTarget {
            sink: StatusSinkSpec::Local {
                dir: status_dir.display().to_string(),
            },
            notify_queue_url: None,
        },
        created_at: chrono::Utc::now(),
    }
}

fn local_revision() -> Revision {
    Revision::Local {
        path: "/srv/bundle.tgz".into(),
        bundle_type: BundleType::Tgz,
        sha256: None,
    }
}

#[test]
fn protocol_rejects_unknown_version_and_malformed_fields() {
    let s = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_slice(&command("d-p", local_revision(), s.path()).to_json()).unwrap();
    v["version"] = serde_json::json!(3);
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "message has version 3, this agent understands version 1; upgrade the agent or send a \
         version 1 message"
    );

    v["version"] = serde_json::json!(1);
    v["revision"]["bundle_type"] = serde_json::json!("rar");
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(
        matches!(&e, ProtocolError::Field { field, .. } if field.starts_with("revision")),
        "{e}"
    );
    assert!(e.to_string().contains("rar"), "{e}");

    v["revision"]["bundle_type"] = serde_json::json!("tgz");
    v["is_rollback"] = serde_json::json!("yes");
    let e = Command::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(e.to_string().starts_with("field `is_rollback`"), "{e}");

    let e = Command::from_json(b"{\"version\": 1,").unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}
