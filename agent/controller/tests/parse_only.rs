//! `PIER_PARSE_ONLY=1`: the real `pier` binary parses its arguments and stops, which is how
//! `scripts/check-examples` checks the `pier` invocations in docs/examples/. A good command
//! line must pass, a bad one must fail, and nothing may be read on the way.

use std::process::{Command, Output};

/// Runs the `pier` binary of this package with only `PIER_PARSE_ONLY=1` in its environment
/// (so no `PIER_*` or `AWS_*` variable of the test's environment fills a flag in).
fn parse_only(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pier"))
        .args(args)
        .env_clear()
        .env("PIER_PARSE_ONLY", "1")
        .output()
        .expect("run pier")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_good_command_line_names_its_subcommand_and_exits_0() {
    let out = parse_only(&[
        "deploy",
        "--application",
        "shop",
        "--deployment-group",
        "shop-staging",
        "--revision",
        "@revision.json",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "parsed: deploy\n");

    let out = parse_only(&["group", "put", "groups/web.yml", "--status-bucket", "b"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "parsed: group put\n");
}

#[test]
fn an_unknown_flag_fails_as_a_usage_error() {
    let out = parse_only(&["deploy", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(stdout(&out).is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"),
        "{out:?}"
    );
    // A missing required flag is the parser's business too.
    let out = parse_only(&["push", "--application", "shop"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn nothing_is_read_before_the_parse_ends() {
    // Without PIER_PARSE_ONLY, `--env` reads the controller configuration and a missing file
    // is a usage error; with it, the file is never opened.
    let out = parse_only(&[
        "--env",
        "production",
        "--controller-config",
        "/nonexistent/pier/controller.yml",
        "status",
        "d-AB12CD34E",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "parsed: status\n");
}

#[test]
fn parse_only_is_not_in_the_help() {
    let out = parse_only(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!stdout(&out).contains("PARSE_ONLY"), "{}", stdout(&out));
}
