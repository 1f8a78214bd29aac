//! Hostile archives against the real `pier-agent deploy-local` and `validate`: a gigabyte
//! GNU long name or pax header (a few MB gzipped) is refused from its header, quickly, in
//! little memory and with a short message; so is a zip entry with a huge extra field; a name
//! that is not UTF-8 is refused naming it escaped, never a panic.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{agent_bin, run_cmd, Agent, Run, Scratch};

/// What the agent may print about one refused bundle.
const MAX_OUTPUT: usize = 8 * 1024;
/// The agent's peak memory while refusing one.
const MAX_RSS_KIB: u64 = 100 * 1024;
/// Generous: the point is that nothing reads the gigabyte, not a benchmark.
const MAX_TIME: Duration = Duration::from_secs(60);
/// The largest file the agent may leave under its root for one refused deployment.
const MAX_STATE_FILE: u64 = 64 * 1024;

const APPSPEC: &str =
    "version: 0.0\nos: linux\nfiles:\n  - source: /\n    destination: /tmp/pier-never\n";

/// Writes a tgz that starts with a record of `kind` declaring 1 GiB and holding it all,
/// then an appspec. The gigabyte streams through the system's `gzip -9` (about 1 MB on
/// disk), so the test never holds it either.
fn gigabyte_record_tgz(path: &Path, kind: tar::EntryType) {
    let size: u64 = 1 << 30;
    let mut gzip = Command::new("gzip")
        .arg("-9")
        .stdin(Stdio::piped())
        .stdout(File::create(path).unwrap())
        .spawn()
        .expect("run gzip");
    let mut tar_out = gzip.stdin.take().unwrap();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    tar_out.write_all(h.as_bytes()).unwrap();
    std::io::copy(&mut std::io::repeat(0).take(size), &mut tar_out).unwrap();
    let mut b = tar::Builder::new(&mut tar_out);
    let mut a = tar::Header::new_gnu();
    a.set_size(APPSPEC.len() as u64);
    a.set_mode(0o644);
    b.append_data(&mut a, "appspec.yml", APPSPEC.as_bytes())
        .unwrap();
    b.finish().unwrap();
    drop(b);
    drop(tar_out);
    assert!(gzip.wait().unwrap().success());
}

/// Runs `cmd` under `/usr/bin/time`, returning its result (time's line removed), its peak
/// RSS in KiB and how long it took.
fn measured(cmd: &mut Command) -> (Run, u64, Duration) {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("PIER_MAXRSS_KIB=%M")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let started = Instant::now();
    let mut run = run_cmd(&mut timed);
    let took = started.elapsed();
    let (rest, rss) = run
        .stderr
        .rsplit_once("PIER_MAXRSS_KIB=")
        .unwrap_or_else(|| panic!("no RSS from /usr/bin/time: {}", run.stderr));
    let rss: u64 = rss.trim().parse().unwrap();
    run.stderr = rest.to_string();
    (run, rss, took)
}

#[track_caller]
fn assert_refused_small(what: &str, run: &Run, rss: u64, took: Duration, expect: &str) {
    eprintln!(
        "{what}: exit {}, {} KiB peak RSS, {took:?}, {} bytes of output",
        run.code,
        rss,
        run.all().len()
    );
    assert_ne!(run.code, 0, "{what}: accepted\n{}", run.all());
    assert!(
        run.all().contains(expect),
        "{what}: no {expect:?} in\n{}",
        run.all()
    );
    assert!(!run.all().contains("panicked"), "{what}: {}", run.all());
    assert!(
        run.all().len() < MAX_OUTPUT,
        "{what}: {} bytes of output",
        run.all().len()
    );
    assert!(rss < MAX_RSS_KIB, "{what}: peak RSS {rss} KiB");
    assert!(took < MAX_TIME, "{what}: took {took:?}");
}

/// No file the agent wrote (journal, status, logs) grew with the input.
#[track_caller]
fn assert_state_small(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            assert_state_small(&e.path());
        } else {
            assert!(
                m.len() < MAX_STATE_FILE,
                "{} is {} bytes",
                e.path().display(),
                m.len()
            );
        }
    }
}

#[test]
fn gigabyte_long_name_and_pax_records_are_refused_from_their_headers() {
    for (kind, expect) in [
        (tar::EntryType::GNULongName, "GNU long-name record"),
        (tar::EntryType::XHeader, "pax extended header"),
    ] {
        let s = Scratch::new();
        let tgz = s.path().join("hostile.tgz");
        gigabyte_record_tgz(&tgz, kind);
        assert!(fs::metadata(&tgz).unwrap().len() < 4 << 20);
        let agent = Agent::builder(s.path()).build();
        let (run, rss, took) = measured(&mut agent.deploy_local_cmd(&tgz));
        assert_refused_small(&format!("deploy-local {kind:?}"), &run, rss, took, expect);
        assert!(run.all().contains("1073741824"), "{}", run.all());
        assert_state_small(agent.root());

        let (run, rss, took) = measured(Command::new(agent_bin()).arg("validate").arg(&tgz));
        assert_refused_small(&format!("validate {kind:?}"), &run, rss, took, expect);
    }
}

#[test]
fn zip_entry_with_a_huge_extra_field_is_refused() {
    let s = Scratch::new();
    let archive = s.path().join("hostile.zip");
    {
        let mut z = zip::ZipWriter::new(File::create(&archive).unwrap());
        let plain = zip::write::SimpleFileOptions::default();
        z.start_file("appspec.yml", plain).unwrap();
        z.write_all(APPSPEC.as_bytes()).unwrap();
        let mut opts = zip::write::FullFileOptions::default();
        opts.add_extra_field(0x6d6b, vec![7u8; 60_000], false)
            .unwrap();
        z.start_file("padded.txt", opts).unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
    }
    let agent = Agent::builder(s.path()).build();
    let (run, rss, took) = measured(&mut agent.deploy_local_cmd(&archive));
    assert_refused_small(
        "deploy-local zip",
        &run,
        rss,
        took,
        "extra field of 60004 bytes",
    );
    assert!(run.all().contains("\"padded.txt\""), "{}", run.all());
    assert_state_small(agent.root());
    let (run, rss, took) = measured(Command::new(agent_bin()).arg("validate").arg(&archive));
    assert_refused_small(
        "validate zip",
        &run,
        rss,
        took,
        "extra field of 60004 bytes",
    );
}

/// A `files` source holding a name that is not UTF-8: refused (docs/appspec.md says so), the
/// name shown escaped, the journal and status still written, no panic.
#[test]
fn a_source_name_that_is_not_utf8_is_refused_not_a_panic() {
    let s = Scratch::new();
    let dest = s.path().join("dest");
    let appspec = format!(
        "version: 0.0\nos: linux\nfiles:\n  - source: app\n    destination: {}\n",
        dest.display()
    );
    s.write("bundle/appspec.yml", &appspec);
    s.write("bundle/app/ok.txt", "ok");
    fs::write(
        s.path()
            .join("bundle/app")
            .join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")),
        "x",
    )
    .unwrap();
    // The same bundle as a tgz.
    let tgz = s.path().join("bundle.tgz");
    {
        let mut gz =
            flate2::write::GzEncoder::new(File::create(&tgz).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(&mut gz);
        b.append_dir_all(".", s.path().join("bundle")).unwrap();
        b.finish().unwrap();
    }
    for bundle in [s.path().join("bundle"), tgz] {
        let agent = Agent::builder(
            s.path()
                .join(format!("agent-{}", bundle.extension().is_some())),
        )
        .build();
        let run = agent.deploy_local(&bundle, &[]);
        assert_ne!(run.code, 0, "{}", run.all());
        assert!(run.all().contains("caf\\xe9.txt"), "{}", run.all());
        assert!(run.all().contains("not UTF-8"), "{}", run.all());
        assert!(!run.all().contains("panicked"), "{}", run.all());
        assert!(!dest.exists(), "something was installed");
        assert_state_small(agent.root());
    }
}
