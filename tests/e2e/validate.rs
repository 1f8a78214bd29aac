//! `pier-agent validate` end to end: every AppSpec rule with its located message, the example
//! bundles, bundle directories and archives (.tar, .tgz, .zip) built here, JSON output, and
//! the exit codes 0 (valid), 1 (invalid) and 2 (usage).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::support::{agent_bin, example, run, Run, Scratch};

const HEAD: &str = "version: 0.0\nos: linux\n";

fn validate(path: &Path, extra: &[&str]) -> Run {
    let p = path.to_str().unwrap();
    let mut args = vec!["validate", p];
    args.extend_from_slice(extra);
    run(&agent_bin(), &args)
}

/// Writes `yaml` as a lone appspec.yml, validates it, and checks the exit code and that each
/// of `expected` ("LINE:COL: severity: key: message...") begins a line after the file name.
#[track_caller]
fn expect(yaml: &str, code: i32, expected: &[&str]) -> Run {
    let s = Scratch::new();
    let file = s.write("appspec.yml", yaml);
    let out = validate(&file, &[]).code(code);
    let prefix = format!("{}:", file.display());
    for want in expected {
        assert!(
            out.stdout.lines().any(|l| l
                .strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(want))),
            "no line `{prefix}{want}...` in:\n{}",
            out.stdout
        );
    }
    out
}

#[track_caller]
fn expect_error(yaml: &str, expected: &str) {
    expect(yaml, 1, &[expected]);
}

// --- The document as a whole -------------------------------------------------------------

#[test]
fn empty_file_is_an_error() {
    expect_error(
        "",
        "1:1: error: the AppSpec is empty; start with `version: 0.0`",
    );
    expect_error("# only a comment\n", "1:1: error: the AppSpec is empty");
}

#[test]
fn yaml_syntax_error_is_located() {
    expect_error(
        "version: 0.0\nos: linux\nhooks:\n  ApplicationStart:\n   - location: a.sh\n  x: [\n",
        "7:1: error: YAML syntax error:",
    );
    expect_error(
        "version: 0.0\nos: \"linux\n",
        "2:5: error: YAML syntax error: while scanning a quoted scalar",
    );
}

#[test]
fn not_a_mapping_is_an_error() {
    expect_error(
        "- version: 0.0\n",
        "1:1: error: the AppSpec must be a mapping of keys (version, os, files, hooks...), found a list",
    );
}

#[test]
fn text_that_is_not_utf8_is_located() {
    let s = Scratch::new();
    let file = s.path().join("appspec.yml");
    std::fs::write(&file, b"version: 0.0\nos: li\xffnux\n").unwrap();
    let out = validate(&file, &[]).code(1);
    assert!(
        out.stdout
            .contains(":2:7: error: the AppSpec is not UTF-8 text; save the file as UTF-8"),
        "{}",
        out.stdout
    );
}

#[test]
fn wrong_version_is_an_error() {
    expect_error(
        "version: 1.0\nos: linux\n",
        "1:10: error: version: version must be 0.0, found `1.0`; write `version: 0.0`",
    );
}

#[test]
fn missing_version_is_an_error() {
    expect_error(
        "os: linux\n",
        "1:1: error: version: `version` is missing; add `version: 0.0`",
    );
}

#[test]
fn version_without_value_points_at_the_key() {
    expect_error(
        "os: linux\nversion:\n",
        "2:1: error: version: `version` has no value; add `version: 0.0`",
    );
}

#[test]
fn merge_keys_are_honoured_like_codedeploy() {
    let out = expect(
        "x-dest: &web\n  destination: /var/www/app\nversion: 0.0\nos: linux\nfiles:\n  - <<: *web\n    source: site\n",
        0,
        &["1:1: warning: x-dest: unknown key `x-dest` is ignored"],
    );
    assert!(
        !out.stdout.contains("destination` is missing"),
        "{}",
        out.stdout
    );
}

#[test]
fn second_document_is_a_warning() {
    expect(
        "version: 0.0\nos: linux\n---\nversion: 1\n",
        0,
        &["3:1: warning: a second YAML document starts here and is ignored"],
    );
}

#[test]
fn windows_os_is_refused_on_linux() {
    expect_error(
        "version: 0.0\nos: windows\n",
        "2:5: error: os: this AppSpec is for Windows Server instances and pier deploys to Linux; write `os: linux`",
    );
}

#[test]
fn unknown_or_missing_os_is_an_error() {
    expect_error(
        "version: 0.0\nos: Linux\n",
        "2:5: error: os: os must be linux (or windows, which pier refuses), found `Linux`; write it in lower case: `os: linux`",
    );
    expect_error(
        "version: 0.0\n",
        "1:1: error: os: `os` is missing; add `os: linux`",
    );
}

#[test]
fn duplicate_key_is_an_error() {
    expect_error(
        "version: 0.0\nos: linux\nos: linux\n",
        "3:1: error: os: `os` appears twice (first on line 2)",
    );
}

#[test]
fn unknown_key_is_a_warning_with_a_suggestion() {
    expect(
        "version: 0.0\nos: linux\nhoks:\n  ApplicationStart: []\n",
        0,
        &["3:1: warning: hoks: unknown key `hoks` is ignored; did you mean `hooks`?"],
    );
}

// --- files ------------------------------------------------------------------------------

#[test]
fn files_must_be_a_list() {
    expect_error(
        &format!("{HEAD}files:\n  source: a\n  destination: /b\n"),
        "4:3: error: files: expected a list, found a mapping",
    );
}

#[test]
fn missing_source_is_an_error() {
    expect_error(
        &format!("{HEAD}files:\n  - destination: /srv/app\n"),
        "4:5: error: files[0].source: `source` is missing; add `source: PATH`",
    );
}

#[test]
fn missing_destination_is_an_error() {
    expect_error(
        &format!("{HEAD}files:\n  - source: app\n"),
        "4:5: error: files[0].destination: `destination` is missing",
    );
}

#[test]
fn source_escaping_the_bundle_is_an_error() {
    expect_error(
        &format!("{HEAD}files:\n  - source: app/../../etc\n    destination: /srv\n"),
        "4:13: error: files[0].source: source `app/../../etc` climbs out of the bundle with `..`",
    );
}

#[test]
fn relative_destination_is_an_error() {
    expect_error(
        &format!("{HEAD}files:\n  - source: app\n    destination: srv/app\n"),
        "5:18: error: files[0].destination: destination `srv/app` is not an absolute path; write an absolute directory path",
    );
}

#[test]
fn destination_with_dotdot_is_an_error() {
    expect_error(
        &format!("{HEAD}files:\n  - source: app\n    destination: /srv/../etc\n"),
        "5:18: error: files[0].destination: destination `/srv/../etc` contains `..`",
    );
}

#[test]
fn same_source_to_same_destination_twice_is_an_error() {
    expect_error(
        &format!(
            "{HEAD}files:\n  - source: app\n    destination: /srv/app\n  - source: ./app/\n    destination: /srv/app/\n"
        ),
        "6:5: error: files[1]: copies `app` to `/srv/app` a second time (files[0] on line 4 already does)",
    );
}

#[test]
fn bad_file_exists_behavior_is_an_error() {
    expect_error(
        &format!("{HEAD}file_exists_behavior: overwrite\n"),
        "3:23: error: file_exists_behavior: unknown file_exists_behavior `overwrite`; write it in capitals: `OVERWRITE`",
    );
    expect_error(
        &format!("{HEAD}file_exists_behavior: REPLACE\n"),
        "3:23: error: file_exists_behavior: unknown file_exists_behavior `REPLACE`; use DISALLOW (the default), OVERWRITE or RETAIN",
    );
}

// --- permissions ------------------------------------------------------------------------

const FILES: &str = "files:\n  - source: /\n    destination: /srv/app\n";

fn perm(body: &str) -> String {
    format!("{HEAD}{FILES}permissions:\n{body}")
}

#[test]
fn permission_without_object_is_an_error() {
    expect_error(
        &perm("  - owner: root\n"),
        "7:5: error: permissions[0].object: `object` is missing",
    );
}

#[test]
fn relative_object_is_an_error() {
    expect_error(
        &perm("  - object: srv/app\n    owner: root\n"),
        "7:13: error: permissions[0].object: object `srv/app` is not an absolute path",
    );
}

#[test]
fn bad_mode_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    mode: 648\n"),
        "8:11: error: permissions[0].mode: mode `648` is not octal (digit 8); write 3 or 4 octal digits",
    );
    expect_error(
        &perm("  - object: /srv/app\n    mode: 75\n"),
        "8:11: error: permissions[0].mode: mode must be 3 or 4 octal digits, found `75`",
    );
    expect_error(
        &perm("  - object: /srv/app\n    mode: rwxr-xr-x\n"),
        "8:11: error: permissions[0].mode: mode must be 3 or 4 octal digits, found `rwxr-xr-x`",
    );
}

#[test]
fn unquoted_leading_zero_mode_is_a_warning() {
    expect(
        &perm("  - object: /srv/app\n    mode: 0644\n"),
        0,
        &["8:11: warning: permissions[0].mode: CodeDeploy's YAML reads an unquoted `0644` as an octal number"],
    );
    // Quoted, it means the same everywhere: no warning.
    let out = expect(&perm("  - object: /srv/app\n    mode: \"0644\"\n"), 0, &[]);
    assert!(
        out.stdout.contains("valid (0 warning(s))"),
        "{}",
        out.stdout
    );
}

#[test]
fn bad_acl_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    acls:\n      - u:bob:rw\n      - x:bob:rw\n"),
        "10:9: error: permissions[0].acls[1]: ACL entry `x:bob:rw` is invalid: unknown entry type `x` (use u, g, m or o)",
    );
    expect_error(
        &perm("  - object: /srv/app\n    acls: [\"o:bob:r\"]\n"),
        "8:12: error: permissions[0].acls[0]: ACL entry `o:bob:r` is invalid: a `o` entry takes no name",
    );
    expect_error(
        &perm("  - object: /srv/app\n    acls: [\"u:bob:rwq\"]\n"),
        "8:12: error: permissions[0].acls[0]: ACL entry `u:bob:rwq` is invalid: `q` is not a permission",
    );
}

#[test]
fn selinux_context_without_type_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    context:\n      name: system_u\n"),
        "9:7: error: permissions[0].context.type: an SELinux context needs a `type`",
    );
}

#[test]
fn bad_selinux_range_or_name_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    context:\n      type: httpd_sys_content_t\n      range: s0:c9.c2\n"),
        "10:14: error: permissions[0].context.range: range `s0:c9.c2` is invalid: category range `c9.c2` runs backwards",
    );
    expect_error(
        &perm("  - object: /srv/app\n    context:\n      type: httpd-content\n"),
        "9:13: error: permissions[0].context.type: `httpd-content` is not a valid SELinux type",
    );
}

#[test]
fn bad_object_type_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    mode: 644\n    type:\n      - file\n      - symlink\n"),
        "11:9: error: permissions[0].type[1]: unknown object type `symlink`; use `file` or `directory`",
    );
    expect_error(
        &perm("  - object: /srv/app\n    mode: 644\n    type: []\n"),
        "9:11: error: permissions[0].type: type lists no object kinds",
    );
}

#[test]
fn bad_pattern_is_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    pattern: \"[a\"\n    mode: 644\n"),
        "8:14: error: permissions[0].pattern: pattern `[a` is not a valid glob",
    );
}

#[test]
fn duplicate_permission_objects_are_an_error() {
    expect_error(
        &perm("  - object: /srv/app\n    mode: 644\n  - object: /srv/app/\n    owner: root\n    type: [file]\n"),
        "9:5: error: permissions[1].object: `/srv/app` already has permissions (permissions[0] on line 7)",
    );
    // Both problems of a broken duplicate are reported.
    expect(
        &perm("  - object: /srv/app\n    mode: 999\n  - object: /srv/app\n    mode: 644\n"),
        1,
        &[
            "8:11: error: permissions[0].mode: mode `999` is not octal",
            "9:5: error: permissions[1].object: `/srv/app` already has permissions (permissions[0] on line 7)",
        ],
    );
    // Told apart by type, they are fine.
    expect(
        &perm("  - object: /srv/app\n    mode: 644\n    type: [file]\n  - object: /srv/app\n    mode: 755\n    type: [directory]\n"),
        0,
        &[],
    );
}

#[test]
fn object_outside_every_destination_is_a_warning() {
    expect(
        &perm("  - object: /etc/passwd\n    mode: 644\n"),
        0,
        &["7:5: warning: permissions[0].object: `/etc/passwd` is not under any files destination"],
    );
}

#[test]
fn permission_setting_nothing_is_a_warning() {
    expect(
        &perm("  - object: /srv/app\n"),
        0,
        &["7:5: warning: permissions[0]: this entry sets nothing"],
    );
}

// --- hooks ------------------------------------------------------------------------------

#[test]
fn unknown_event_is_an_error() {
    expect_error(
        &format!("{HEAD}hooks:\n  AfterDeploy:\n    - location: a.sh\n"),
        "4:3: error: hooks.AfterDeploy: unknown lifecycle event `AfterDeploy`; use one of: BeforeBlockTraffic,",
    );
}

#[test]
fn event_names_are_case_sensitive() {
    expect_error(
        &format!("{HEAD}hooks:\n  applicationStart:\n    - location: a.sh\n"),
        "4:3: error: hooks.applicationStart: unknown lifecycle event `applicationStart`; did you mean `ApplicationStart`? (event names are case-sensitive)",
    );
}

#[test]
fn agent_events_take_no_scripts() {
    expect_error(
        &format!("{HEAD}hooks:\n  Install:\n    - location: a.sh\n"),
        "4:3: error: hooks.Install: Install is performed by the agent itself and cannot run scripts",
    );
    expect_error(
        &format!("{HEAD}hooks:\n  DownloadBundle:\n    - location: a.sh\n"),
        "4:3: error: hooks.DownloadBundle: DownloadBundle is performed by the agent itself",
    );
}

#[test]
fn hook_without_location_is_an_error() {
    expect_error(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - timeout: 30\n"),
        "5:7: error: hooks.AfterInstall[0].location: `location` is missing",
    );
}

#[test]
fn hook_location_escaping_the_bundle_is_an_error() {
    expect_error(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: ../outside.sh\n"),
        "5:17: error: hooks.AfterInstall[0].location: location `../outside.sh` climbs out of the bundle",
    );
}

#[test]
fn absolute_hook_location_is_read_in_the_bundle_with_a_warning() {
    expect(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: /scripts/go.sh\n"),
        0,
        &["5:17: warning: hooks.AfterInstall[0].location: location `/scripts/go.sh` is read inside the bundle, as `scripts/go.sh`, not on the host; write `location: scripts/go.sh`"],
    );
}

#[test]
fn non_positive_or_non_numeric_timeout_is_an_error() {
    for (t, msg) in [
        ("0", "timeout must be a positive number of seconds, found 0"),
        (
            "-5",
            "timeout must be a positive number of seconds, found -5",
        ),
        (
            "2.5",
            "timeout must be a whole number of seconds, found `2.5`",
        ),
        (
            "ten",
            "timeout must be a whole number of seconds, found `ten`",
        ),
    ] {
        expect_error(
            &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: a.sh\n      timeout: {t}\n"),
            &format!("6:16: error: hooks.AfterInstall[0].timeout: {msg}"),
        );
    }
}

#[test]
fn timeout_above_codedeploy_limit_is_a_warning() {
    expect(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: a.sh\n      timeout: 7200\n"),
        0,
        &["6:16: warning: hooks.AfterInstall[0].timeout: timeout 7200 s is above CodeDeploy's limit of 3600 s"],
    );
}

#[test]
fn duplicate_event_is_an_error() {
    expect_error(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: a.sh\n  AfterInstall:\n    - location: b.sh\n"),
        "6:3: error: hooks.AfterInstall: AfterInstall appears twice (first on line 4)",
    );
}

#[test]
fn runas_user_missing_on_this_host_is_an_error() {
    expect_error(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: a.sh\n      runas: pier-no-such-user\n"),
        "5:7: error: hooks.AfterInstall[0].runas: user `pier-no-such-user` does not exist on this host",
    );
    // An existing user is fine.
    expect(
        &format!("{HEAD}hooks:\n  AfterInstall:\n    - location: a.sh\n      runas: root\n"),
        0,
        &[],
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let out = expect(
        "version: 2\nos: linux\nfiles:\n  - source: /\n    destination: relative\nhooks:\n  ValidateService:\n    - location: v.sh\n      timeout: 0\n",
        1,
        &[
            "1:10: error: version:",
            "5:18: error: files[0].destination:",
            "9:16: error: hooks.ValidateService[0].timeout:",
        ],
    );
    assert!(
        out.stdout.contains("invalid: 3 error(s), 0 warning(s)"),
        "{}",
        out.stdout
    );
}

// --- bundles: directories and archives --------------------------------------------------

const BUNDLE_APPSPEC: &str = "version: 0.0
os: linux
files:
  - source: site
    destination: /var/www/t
  - source: conf/app.conf
    destination: /etc/t
hooks:
  ValidateService:
    - location: scripts/check.sh
";

/// A small valid bundle directory.
fn bundle(s: &Scratch) -> PathBuf {
    s.write("b/appspec.yml", BUNDLE_APPSPEC);
    s.write("b/site/index.html", "<p>hi</p>\n");
    s.write("b/conf/app.conf", "x = 1\n");
    s.script("b/scripts/check.sh", "#!/bin/sh\ntrue\n");
    s.path().join("b")
}

#[test]
fn every_example_validates() {
    let dir = crate::support::repo_root().join("appspec-examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.join("appspec.yml").is_file() {
            let out = validate(&path, &[]).success();
            assert!(
                out.stdout.contains("valid (0 warning(s))"),
                "{}",
                out.stdout
            );
            n += 1;
        }
    }
    assert!(n >= 4, "expected at least four examples, found {n}");
    for name in [
        "static-site",
        "systemd-service",
        "permissions",
        "multi-destination",
    ] {
        assert!(
            example(name).join("README.md").is_file(),
            "{name} has no README.md"
        );
    }
}

#[test]
fn bundle_directory_validates() {
    let s = Scratch::new();
    let out = validate(&bundle(&s), &[]).success();
    assert!(out.stdout.contains("appspec.yml: valid"), "{}", out.stdout);
}

#[test]
fn missing_source_and_script_in_bundle_are_errors() {
    let s = Scratch::new();
    let b = bundle(&s);
    std::fs::remove_file(b.join("conf/app.conf")).unwrap();
    std::fs::remove_file(b.join("scripts/check.sh")).unwrap();
    let out = validate(&b, &[]).code(1);
    let label = b.join("appspec.yml").display().to_string();
    for want in [
        format!("{label}:6:5: error: files[1].source: `conf/app.conf` does not exist in the bundle"),
        format!("{label}:10:7: error: hooks.ValidateService[0].location: script `scripts/check.sh` does not exist in the bundle"),
    ] {
        assert!(out.stdout.contains(&want), "missing `{want}` in:\n{}", out.stdout);
    }
}

#[test]
fn pattern_on_a_file_object_is_an_error_in_a_bundle() {
    let s = Scratch::new();
    let b = bundle(&s);
    s.write(
        "b/appspec.yml",
        &format!("{BUNDLE_APPSPEC}permissions:\n  - object: /etc/t/app.conf\n    pattern: \"*.conf\"\n    mode: 640\n"),
    );
    let out = validate(&b, &[]).code(1);
    assert!(
        out.stdout.contains(":12:5: error: permissions[0]: `/etc/t/app.conf` is a file (installed from files[1]) and pattern/except apply only to directory objects"),
        "{}",
        out.stdout
    );
}

#[test]
fn two_files_landing_on_one_path_are_an_error_in_a_bundle() {
    let s = Scratch::new();
    let b = bundle(&s);
    s.write("b/other/app.conf", "y = 2\n");
    s.write(
        "b/appspec.yml",
        &BUNDLE_APPSPEC.replace(
            "hooks:",
            "  - source: other/app.conf\n    destination: /etc/t\nhooks:",
        ),
    );
    let out = validate(&b, &[]).code(1);
    assert!(
        out.stdout.contains(":8:5: error: files[2]: `other/app.conf` and files[1]'s `conf/app.conf` would both be installed as `/etc/t/app.conf`"),
        "{}",
        out.stdout
    );
}

#[test]
fn appspec_yaml_is_found_and_dash_a_overrides() {
    let s = Scratch::new();
    let b = bundle(&s);
    std::fs::rename(b.join("appspec.yml"), b.join("appspec.yaml")).unwrap();
    let out = validate(&b, &[]).success();
    assert!(out.stdout.contains("appspec.yaml: valid"), "{}", out.stdout);
    std::fs::write(b.join("custom.yml"), "version: 0.0\nos: windows\n").unwrap();
    let out = validate(&b, &["-A", "custom.yml"]).code(1);
    assert!(
        out.stdout.contains("custom.yml:2:5: error: os:"),
        "{}",
        out.stdout
    );
}

fn tar_bundle(dir: &Path, out: &Path, gzip: bool) {
    let file = File::create(out).unwrap();
    let writer: Box<dyn Write> = if gzip {
        Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(file)
    };
    let mut ar = tar::Builder::new(writer);
    ar.append_dir_all(".", dir).unwrap();
    ar.into_inner().unwrap().flush().unwrap();
}

fn zip_bundle(dir: &Path, out: &Path) {
    let mut zw = zip::ZipWriter::new(File::create(out).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
            if p.is_dir() {
                zw.add_directory(format!("{rel}/"), opts).unwrap();
                stack.push(p);
            } else {
                zw.start_file(rel, opts).unwrap();
                zw.write_all(&std::fs::read(&p).unwrap()).unwrap();
            }
        }
    }
    zw.finish().unwrap();
}

#[test]
fn archives_validate_without_unpacking() {
    let s = Scratch::new();
    let b = bundle(&s);
    let tar = s.path().join("bundle.tar");
    let tgz = s.path().join("bundle.tgz");
    let targz = s.path().join("bundle.tar.gz");
    let zip = s.path().join("bundle.zip");
    tar_bundle(&b, &tar, false);
    tar_bundle(&b, &tgz, true);
    tar_bundle(&b, &targz, true);
    zip_bundle(&b, &zip);
    for a in [&tar, &tgz, &targz, &zip] {
        let out = validate(a, &[]).success();
        assert!(
            out.stdout
                .contains(&format!("{}/appspec.yml: valid", a.display())),
            "{}",
            out.stdout
        );
    }
    // Nothing was unpacked beside the archives.
    let names: Vec<_> = std::fs::read_dir(s.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
}

#[test]
fn archive_with_missing_source_is_invalid() {
    let s = Scratch::new();
    let b = bundle(&s);
    std::fs::remove_dir_all(b.join("site")).unwrap();
    for (name, zip) in [("bundle.tgz", false), ("bundle.zip", true)] {
        let a = s.path().join(name);
        if zip {
            zip_bundle(&b, &a);
        } else {
            tar_bundle(&b, &a, true);
        }
        let out = validate(&a, &[]).code(1);
        assert!(
            out.stdout.contains(&format!(
                "{}/appspec.yml:4:5: error: files[0].source: `site` does not exist in the bundle",
                a.display()
            )),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn archive_type_is_sniffed_when_the_name_does_not_say() {
    let s = Scratch::new();
    let b = bundle(&s);
    let a = s.path().join("revision.bin");
    tar_bundle(&b, &a, true);
    validate(&a, &[]).success();
}

// --- output and exit codes --------------------------------------------------------------

#[test]
fn json_output_parses_and_carries_every_finding() {
    let s = Scratch::new();
    let file = s.write(
        "appspec.yml",
        "version: 0.0\nos: linux\nfile_exists_behavior: retain\nhooks:\n  AfterInstall:\n    - location: a.sh\n      timeout: 9000\n",
    );
    let out = validate(&file, &["--format", "json"]).code(1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"], 1);
    assert_eq!(v["warnings"], 1);
    let d = &v["diagnostics"][0];
    assert_eq!(d["severity"], "error");
    assert_eq!(d["key"], "file_exists_behavior");
    assert_eq!(d["span"]["line"], 3);
    assert_eq!(d["span"]["col"], 23);
    assert_eq!(d["file"], file.display().to_string());
    assert!(d["hint"].as_str().unwrap().contains("RETAIN"));
    assert_eq!(v["diagnostics"][1]["severity"], "warning");

    let ok = validate(&example("static-site"), &["--format", "json"]).success();
    let v: serde_json::Value = serde_json::from_str(&ok.stdout).expect("stdout is JSON");
    assert_eq!(v["valid"], true);
    assert_eq!(v["diagnostics"].as_array().unwrap().len(), 0);
}

#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new();
    // PATH missing.
    let out = validate(&s.path().join("nope"), &[]).code(2);
    assert!(
        out.stderr.contains("no such file or directory"),
        "{}",
        out.stderr
    );
    // A directory with no AppSpec.
    std::fs::create_dir(s.path().join("empty")).unwrap();
    let out = validate(&s.path().join("empty"), &[]).code(2);
    assert!(
        out.stderr
            .contains("no appspec.yml or appspec.yaml at the bundle root"),
        "{}",
        out.stderr
    );
    // -A must name a file at the root.
    validate(&bundle(&s), &["-A", "../appspec.yml"]).code(2);
    // An archive that is not one.
    let bad = s.write("broken.zip", "not a zip");
    validate(&bad, &[]).code(2);
    // No PATH at all.
    run(&agent_bin(), &["validate"]).code(2);
    // JSON mode still says why, as JSON.
    let out = validate(&s.path().join("nope"), &["--format", "json"]).code(2);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["usage_error"].as_str().unwrap().contains("no such file"));
}

// --- `pier-agent check-config` -----------------------------------------------------------

/// A valid configuration is summarised (what an installer wrote can be read back); an invalid
/// one exits 78 with every problem named under its key; a missing file is an error, not the
/// defaults (unlike `run` without `--config`).
#[test]
fn check_config_summarises_or_names_every_problem() {
    let s = Scratch::new();
    let good = s.write(
        "agent.yml",
        "transport:\n  type: sqs\n  queue_url: https://sqs.eu-west-1.amazonaws.com/1/pier-web-1\n\
         aws: {region: eu-west-1}\ntags: {role: web}\ndaemon: {deployment_groups: [web-prod]}\n\
         registry: {bucket: fleet, prefix: p}\n",
    );
    let out = run(
        &agent_bin(),
        &["check-config", "-c", good.to_str().unwrap()],
    )
    .success();
    for want in [
        "valid",
        "transport: sqs https://sqs.eu-west-1.amazonaws.com/1/pier-web-1",
        "region: eu-west-1",
        "tags: role=web",
        "deployment groups: web-prod",
        "registry: s3://fleet/p",
        "signing: none: the agent runs OPEN",
    ] {
        assert!(out.stdout.contains(want), "no `{want}` in:\n{}", out.stdout);
    }

    let bad = s.write(
        "bad.yml",
        "colour: blue\nmax_revisions: -1\ntransport: {type: sqs, queue_url: 'ftp://q'}\n",
    );
    let out = run(&agent_bin(), &["check-config", "-c", bad.to_str().unwrap()]).code(78);
    for key in ["colour", "max_revisions", "transport.queue_url"] {
        assert!(
            out.stderr.contains(&format!("  - {key}:")),
            "no problem under `{key}` in:\n{}",
            out.stderr
        );
    }

    let missing = s.path().join("none.yml");
    let out = run(
        &agent_bin(),
        &["check-config", "-c", missing.to_str().unwrap()],
    )
    .code(78);
    assert!(out.stderr.contains("cannot read config"), "{}", out.stderr);
}
