//! Unit tests of the typed model and of the rule helpers; every located message is tested end
//! to end through `pier-agent validate` in tests/e2e/validate.rs.

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;

use super::check::{bundle_path, check_acl, check_range};
use super::*;

const FULL: &str = "\
version: 0.0
os: linux
files:
  - source: /
    destination: /var/www/app/
  - source: ./config//app.conf
    destination: /etc/app
file_exists_behavior: RETAIN
permissions:
  - object: /var/www/app
    pattern: \"*.html\"
    except: [private.html]
    owner: www-data
    group: www-data
    mode: 0640
    acls:
      - u:bob:rw
      - d:g:staff:rx
    context:
      name: system_u
      type: httpd_sys_content_t
      range: s0-s0:c0.c255
    type:
      - file
hooks:
  ApplicationStart:
    - location: scripts/start.sh
      timeout: 300
      runas: www-data
    - location: scripts/./notify.sh
      timeout: 60
  BeforeInstall:
    - location: scripts/prepare.sh
";

#[test]
fn full_appspec_becomes_typed_values() {
    let parsed = parse("appspec.yml", FULL).expect("valid");
    let spec = parsed.spec;
    assert_eq!(spec.version, "0.0");
    assert_eq!(spec.os, Os::Linux);
    assert_eq!(spec.files.len(), 2);
    assert_eq!(spec.files[0].source, "");
    assert_eq!(spec.files[0].destination, PathBuf::from("/var/www/app"));
    assert_eq!(spec.files[0].span, Span { line: 4, col: 5 });
    assert_eq!(spec.files[1].source, "config/app.conf");
    assert_eq!(spec.file_exists_behavior, Some(FileExistsBehavior::Retain));
    let p = &spec.permissions[0];
    assert_eq!(p.pattern.as_deref(), Some("*.html"));
    assert_eq!(p.except, vec!["private.html"]);
    assert_eq!(p.mode, Some(0o640));
    assert_eq!(p.acls, vec!["u:bob:rw", "d:g:staff:rx"]);
    assert_eq!(
        p.context,
        Some(SeLinuxContext {
            user: Some("system_u".into()),
            kind: "httpd_sys_content_t".into(),
            range: Some("s0-s0:c0.c255".into()),
        })
    );
    assert_eq!(p.types, vec![ObjectType::File]);
    let start = spec.hooks_for(LifecycleEvent::ApplicationStart);
    assert_eq!(start.len(), 2);
    assert_eq!(start[0].timeout, Duration::from_secs(300));
    assert_eq!(start[0].runas.as_deref(), Some("www-data"));
    assert_eq!(start[1].location, "scripts/notify.sh");
    assert_eq!(start[1].timeout, Duration::from_secs(60));
    assert_eq!(
        spec.hooks_for(LifecycleEvent::BeforeInstall)[0].timeout,
        Duration::from_secs(3600)
    );
    assert!(spec.hooks_for(LifecycleEvent::ValidateService).is_empty());
    // Hooks come back in lifecycle order whatever the order written.
    let order: Vec<_> = spec.hooks.keys().copied().collect();
    assert_eq!(
        order,
        vec![
            LifecycleEvent::BeforeInstall,
            LifecycleEvent::ApplicationStart
        ]
    );
    // The unquoted 0640 is worth a warning (CodeDeploy's YAML reads it as octal 416).
    assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
    assert_eq!(parsed.warnings[0].key, "permissions[0].mode");
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let text = "version: 1\nos: solaris\nfiles:\n  - source: a\n";
    let diags = parse("x.yml", text).unwrap_err();
    let keys: Vec<&str> = diags.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys, vec!["version", "os", "files[0].destination"]);
    assert_eq!(
        diags[0].to_string(),
        "x.yml:1:10: error: version: version must be 0.0, found `1`; \
         write `version: 0.0`, the only AppSpec version for EC2/on-premises"
    );
}

#[test]
fn lifecycle_events_round_trip_in_order() {
    for (i, ev) in LifecycleEvent::ALL.iter().enumerate() {
        assert_eq!(ev.as_str().parse::<LifecycleEvent>().unwrap(), *ev);
        assert_eq!(ev.to_string(), ev.as_str());
        assert_eq!(
            serde_json::to_string(ev).unwrap(),
            format!("\"{}\"", ev.as_str())
        );
        if i > 0 {
            assert!(LifecycleEvent::ALL[i - 1] < *ev);
        }
    }
    assert!("applicationstart".parse::<LifecycleEvent>().is_err());
    assert!(!LifecycleEvent::Install.is_hookable());
    assert!(!LifecycleEvent::DownloadBundle.is_hookable());
    assert!(LifecycleEvent::ValidateService.is_hookable());
}

#[test]
fn file_exists_behavior_spellings() {
    assert_eq!(FileExistsBehavior::default(), FileExistsBehavior::Disallow);
    for b in ["DISALLOW", "OVERWRITE", "RETAIN"] {
        assert_eq!(b.parse::<FileExistsBehavior>().unwrap().to_string(), b);
    }
    assert!("overwrite".parse::<FileExistsBehavior>().is_err());
}

#[test]
fn bundle_paths_stay_inside() {
    assert_eq!(bundle_path("/").unwrap(), "");
    assert_eq!(bundle_path("a/./b/../c/").unwrap(), "a/c");
    assert!(bundle_path("../etc").is_err());
    assert!(bundle_path("a/../../b").is_err());
}

#[test]
fn acl_entries() {
    for ok in [
        "u:bob:rw",
        "user:bob:rwx",
        "u::rw-",
        "g:staff:r",
        "d:g:staff:rx",
        "default:u:bob:r",
        "m::rx",
        "o::r",
        "o:r",
        "m:rw",
        "u:bob:7",
        "g:staff:X",
    ] {
        assert!(check_acl(ok).is_ok(), "{ok}: {:?}", check_acl(ok));
    }
    for bad in [
        "bob:rw",
        "u:bob",
        "q:bob:rw",
        "o:bob:r",
        "u:bob:rwz",
        "u:bob:rr",
        "u:bob:",
        "u:bob:8",
        "d:u:bob:rw:x",
        "",
    ] {
        assert!(check_acl(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn selinux_ranges() {
    for ok in ["s0", "s0-s0:c0.c1023", "s0:c1,c3.c5", "s1-s2"] {
        assert!(check_range(ok).is_ok(), "{ok}");
    }
    for bad in [
        "", "0", "s", "s1-s0", "s0:c5.c1", "s0:x1", "s0-s1-s2", "s0:",
    ] {
        assert!(check_range(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn environment_checks_use_the_callbacks() {
    let spec = parse("a.yml", FULL).unwrap().spec;
    let has = |p: &str| p == "scripts/start.sh";
    let nobody_exists = |_: &str| false;
    let diags = check_environment("a.yml", &spec, &has, Some(&nobody_exists));
    let msgs: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("files[1].source: `config/app.conf` does not exist")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("script `scripts/notify.sh` does not exist")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("user `www-data` does not exist on this host")),
        "{msgs:#?}"
    );
    let off_host = check_environment("a.yml", &spec, &|_| true, None);
    assert_eq!(off_host.len(), 1);
    assert_eq!(off_host[0].severity, Severity::Warning);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any bytes at all: an answer, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_bytes("fuzz.yml", &bytes);
    }

    /// Text built from AppSpec-like pieces reaches the validator's deeper rules.
    #[test]
    fn appspec_like_text_never_panics(pieces in proptest::collection::vec(prop_oneof![
        Just("version: 0.0\n"), Just("os: linux\n"), Just("files:\n"), Just("hooks:\n"),
        Just("permissions:\n"), Just("  - source: a\n"), Just("    destination: /x\n"),
        Just("  - object: /x\n"), Just("    mode: 0644\n"), Just("    acls: [u::r, 'd:'] \n"),
        Just("    context: {type: t, range: s0-s1:c1.c0}\n"), Just("  ApplicationStart:\n"),
        Just("    - location: ../s.sh\n"), Just("      timeout: -1\n"), Just("&a [*a, *a]\n"),
        Just("x: &b {k: *b}\n"), Just("- \"\\\n"), Just("\t"), Just(": :\n"), Just("{[}\n"),
        Just("    type: []\n"), Just("    except: ~\n"), Just("    pattern: '['\n"),
        Just("file_exists_behavior: retain\n"), Just("---\n"), Just("? a\n: b\n"),
        Just("b: &m {destination: /d}\n"), Just("  - <<: *m\n"), Just("<<: [*m, 1]\n"),
        Just("<<: 3\n"), Just("\u{feff}"), Just("...\n"), Just("  - !!str 0.0\n"),
    ], 0..24)) {
        let text: String = pieces.concat();
        let _ = parse("fuzz.yml", &text);
    }

    /// Any string: an answer, never a panic; an error always carries a 1-based location.
    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        if let Err(diags) = parse("fuzz.yml", &text) {
            prop_assert!(!diags.is_empty());
            for d in diags {
                prop_assert!(d.span.line >= 1 && d.span.col >= 1);
            }
        }
    }
}
