//! bundle unpacking: real archives built here with the tar/zip crates (hostile ones
//! included) unpacked by `pier_engine::bundle::unpack` into real directories, checking both what was
//! refused and that nothing landed outside the destination.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pier_engine::bundle::tar_stream::TarError;
use pier_engine::bundle::unpack::{
    survey_directory, unpack, BundleType, Survey, UnpackError, UnpackPolicy, Unpacked,
};

use crate::support::Scratch;

const S_IFREG: u32 = 0o100_000;

/// One entry of a hand-made tar; names are written raw, so hostile ones go in as they are.
enum T<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Node(&'a str, tar::EntryType),
}

fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    // Bypass set_path, which (rightly) refuses the names these tests need.
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h
}

fn tar_bytes(entries: &[T]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data): (tar::Header, &[u8]) = match e {
            T::File(n, d, m) => (header(n, tar::EntryType::Regular, d.len() as u64, *m), d),
            T::Dir(n) => (header(n, tar::EntryType::Directory, 0, 0o755), b""),
            T::Symlink(n, t) | T::HardLink(n, t) => {
                let kind = if matches!(e, T::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(n, kind, 0, 0o777);
                h.set_link_name_literal(t).unwrap();
                (h, b"")
            }
            T::Node(n, kind) => (header(n, *kind, 0, 0o644), b""),
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A scratch dir holding the archive, and where to unpack it (`<scratch>/deploy/rev`).
struct Case {
    s: Scratch,
    archive: PathBuf,
}

impl Case {
    fn tar(entries: &[T]) -> Case {
        let s = Scratch::new();
        let archive = s.path().join("bundle.tar");
        fs::write(&archive, tar_bytes(entries)).unwrap();
        Case { s, archive }
    }

    fn tgz(entries: &[T]) -> Case {
        let s = Scratch::new();
        let archive = s.path().join("bundle.tgz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar_bytes(entries)).unwrap();
        fs::write(&archive, gz.finish().unwrap()).unwrap();
        Case { s, archive }
    }

    fn zip(build: impl FnOnce(&mut zip::ZipWriter<fs::File>)) -> Case {
        let s = Scratch::new();
        let archive = s.path().join("bundle.zip");
        let mut z = zip::ZipWriter::new(fs::File::create(&archive).unwrap());
        build(&mut z);
        z.finish().unwrap();
        Case { s, archive }
    }

    fn dest(&self) -> PathBuf {
        self.s.path().join("deploy/rev")
    }

    fn run(&self, policy: &UnpackPolicy) -> Result<Unpacked, UnpackError> {
        let kind = pier_engine::bundle::unpack::detect_bundle_type(&self.archive).unwrap();
        unpack(&self.archive, kind, &self.dest(), policy)
    }

    /// Unpacks expecting a refusal that names `entry`; checks the destination is gone and
    /// that `<scratch>` holds nothing but the archive and the (now empty) `deploy/`.
    #[track_caller]
    fn refused(&self, entry: &str) -> UnpackError {
        let err = self.run(&UnpackPolicy::default()).unwrap_err();
        assert!(
            err.to_string().contains(entry),
            "error does not name {entry:?}: {err}"
        );
        self.nothing_left();
        err
    }

    #[track_caller]
    fn nothing_left(&self) {
        assert!(
            !self.dest().exists(),
            "refused bundle left {:?}",
            self.dest()
        );
        let mut names: Vec<_> = fs::read_dir(self.s.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let archive = self.archive.file_name().unwrap().to_str().unwrap();
        let mut want = vec![archive.to_string(), "deploy".to_string()];
        want.sort();
        assert_eq!(names, want);
        assert_eq!(
            fs::read_dir(self.s.path().join("deploy")).unwrap().count(),
            0
        );
    }
}

#[test]
fn tar_entry_with_dotdot_is_refused_and_nothing_escapes() {
    let c = Case::tar(&[
        T::File("ok.txt", b"fine", 0o644),
        T::File("../escape.txt", b"pwned", 0o644),
    ]);
    let err = c.refused("../escape.txt");
    assert!(matches!(err, UnpackError::ParentDir { .. }), "{err}");
    // Also the sneaky form that only climbs out after going down.
    let c = Case::tar(&[T::File("a/../../escape.txt", b"pwned", 0o644)]);
    c.refused("a/../../escape.txt");
}

#[test]
fn tar_entry_with_absolute_path_is_refused() {
    let s = Scratch::new();
    let target = s.path().join("abs-target.txt");
    let name = target.to_str().unwrap().to_string();
    let c = Case::tar(&[T::File(&name, b"pwned", 0o644)]);
    let err = c.refused(&name);
    assert!(matches!(err, UnpackError::AbsolutePath { .. }), "{err}");
    assert!(!target.exists());
}

#[test]
fn writing_through_a_bundle_symlink_is_refused() {
    let outside = Scratch::new();
    let out = outside.path().to_str().unwrap().to_string();
    // Absolute target, then a relative one that climbs out.
    for target in [out.as_str(), "../../../../../../../../tmp"] {
        let c = Case::tar(&[
            T::Symlink("link", target),
            T::File("link/pwned", b"x", 0o644),
        ]);
        let err = c.refused("link/pwned");
        assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

    // The same trick in a zip.
    let c = Case::zip(|z| {
        let o = zip::write::SimpleFileOptions::default();
        z.add_symlink("link", &out, o).unwrap();
        z.start_file("link/pwned", o).unwrap();
        z.write_all(b"x").unwrap();
    });
    c.refused("link/pwned");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn symlinks_are_recreated_as_links_even_when_they_point_outside() {
    let c = Case::tgz(&[
        T::Dir("app"),
        T::File("app/v1.txt", b"one", 0o644),
        T::Symlink("app/current", "v1.txt"),
        T::Symlink("app/etc", "/etc"),
    ]);
    c.run(&UnpackPolicy::default()).unwrap();
    let d = c.dest();
    assert_eq!(
        fs::read_link(d.join("app/current")).unwrap(),
        Path::new("v1.txt")
    );
    assert_eq!(fs::read_link(d.join("app/etc")).unwrap(), Path::new("/etc"));
    assert!(fs::symlink_metadata(d.join("app/etc"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn hard_links_outside_the_bundle_or_to_later_entries_are_refused() {
    for target in ["../../../etc/passwd", "/etc/passwd", "later.txt"] {
        let c = Case::tar(&[
            T::HardLink("h", target),
            T::File("later.txt", b"later", 0o644),
        ]);
        let err = c.refused("\"h\"");
        assert!(
            matches!(err, UnpackError::HardLink { .. }),
            "{target}: {err}"
        );
    }
    // A link to a file extracted before it is fine, and shares the inode.
    let c = Case::tar(&[
        T::File("a.txt", b"data", 0o644),
        T::HardLink("b.txt", "a.txt"),
    ]);
    let u = c.run(&UnpackPolicy::default()).unwrap();
    assert_eq!(u.files, 2);
    let (a, b) = (c.dest().join("a.txt"), c.dest().join("b.txt"));
    assert_eq!(
        fs::metadata(a).unwrap().ino(),
        fs::metadata(&b).unwrap().ino()
    );
    assert_eq!(fs::read(b).unwrap(), b"data");
}

#[test]
fn device_and_fifo_nodes_are_refused() {
    for (kind, what) in [
        (tar::EntryType::Char, "character device"),
        (tar::EntryType::Block, "block device"),
        (tar::EntryType::Fifo, "FIFO"),
    ] {
        let c = Case::tar(&[T::File("ok", b"x", 0o644), T::Node("dev/node", kind)]);
        let err = c.refused("dev/node");
        assert!(err.to_string().contains(what), "{err}");
    }
    // A zip can carry a FIFO in its unix mode bits.
    let c = Case::zip(|z| {
        let o = zip::write::SimpleFileOptions::default().external_attributes(0o010_644 << 16);
        z.start_file("pipe", o).unwrap();
    });
    c.refused("pipe");
}

#[test]
fn setid_bits_are_cleared_and_reported() {
    let c = Case::tar(&[
        T::File("bin/tool", b"#!/bin/sh\n", 0o4755),
        T::File("bin/grp", b"#!/bin/sh\n", 0o2750),
        T::File("bin/plain", b"#!/bin/sh\n", 0o755),
    ]);
    let u = c.run(&UnpackPolicy::default()).unwrap();
    assert_eq!(
        u.setid_entries,
        vec![
            ("bin/tool".to_string(), S_IFREG | 0o4755),
            ("bin/grp".to_string(), S_IFREG | 0o2750),
        ]
    );
    let mode = |n: &str| fs::metadata(c.dest().join(n)).unwrap().mode() & 0o7777;
    assert_eq!(mode("bin/tool"), 0o755);
    assert_eq!(mode("bin/grp"), 0o750);
    assert_eq!(mode("bin/plain"), 0o755);

    // Zips carry the bits in their external attributes.
    let c = Case::zip(|z| {
        let o =
            zip::write::SimpleFileOptions::default().external_attributes((S_IFREG | 0o4755) << 16);
        z.start_file("su", o).unwrap();
        z.write_all(b"#!/bin/sh\n").unwrap();
    });
    let u = c.run(&UnpackPolicy::default()).unwrap();
    assert_eq!(u.setid_entries, vec![("su".to_string(), S_IFREG | 0o4755)]);
    assert_eq!(
        fs::metadata(c.dest().join("su")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn declared_size_past_the_cap_is_refused_before_writing() {
    let big = vec![b'x'; 4096];
    let c = Case::tar(&[T::File("a", &big, 0o644), T::File("b", &big, 0o644)]);
    let policy = UnpackPolicy {
        max_total_bytes: 6000,
        ..UnpackPolicy::default()
    };
    let err = c.run(&policy).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { ref entry, .. } if entry == "\"b\""),
        "{err}"
    );
    c.nothing_left();
}

#[test]
fn zip_bomb_is_refused_by_its_declared_size() {
    // 64 MiB of zeros deflates to a few tens of KiB.
    let c = Case::zip(|z| {
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("zeros", o).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            z.write_all(&chunk).unwrap();
        }
    });
    assert!(fs::metadata(&c.archive).unwrap().len() < 1 << 20);
    let policy = UnpackPolicy {
        max_total_bytes: 8 << 20,
        ..UnpackPolicy::default()
    };
    let err = c.run(&policy).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    c.nothing_left();
}

/// Rewrites every uncompressed-size field of a one-file zip to `size`, the way a bomb lies.
fn lie_about_size(zip: &mut [u8], size: u32) {
    let put = |buf: &mut [u8], at: usize| buf[at..at + 4].copy_from_slice(&size.to_le_bytes());
    let mut i = 0;
    while i + 4 <= zip.len() {
        match &zip[i..i + 4] {
            b"PK\x03\x04" => put(zip, i + 22),
            b"PK\x01\x02" => put(zip, i + 24),
            _ => {}
        }
        i += 1;
    }
}

#[test]
fn zip_bomb_lying_about_its_size_does_not_fill_the_disk() {
    let c = Case::zip(|z| {
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("zeros", o).unwrap();
        z.write_all(&vec![0u8; 16 << 20]).unwrap();
    });
    let mut bytes = fs::read(&c.archive).unwrap();
    lie_about_size(&mut bytes, 10);
    fs::write(&c.archive, bytes).unwrap();
    let policy = UnpackPolicy {
        max_total_bytes: 1 << 20,
        ..UnpackPolicy::default()
    };
    // Whether the zip reader notices the lie (it does today: "larger than its declared
    // uncompressed size") or unpack's own byte count does, the data must not land.
    let err = c.run(&policy).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::TooLarge { .. } | UnpackError::Corrupt { .. }
        ),
        "{err}"
    );
    c.nothing_left();
}

#[test]
fn too_many_entries_are_refused() {
    let c = Case::tar(&[
        T::File("1", b"", 0o644),
        T::File("2", b"", 0o644),
        T::File("3", b"", 0o644),
    ]);
    let policy = UnpackPolicy {
        max_entries: 2,
        ..UnpackPolicy::default()
    };
    let err = c.run(&policy).unwrap_err();
    assert!(matches!(err, UnpackError::TooManyEntries { .. }), "{err}");
    c.nothing_left();
}

#[test]
fn tgz_and_zip_unpack_files_dirs_and_modes() {
    let c = Case::tgz(&[
        T::Dir("./"),
        T::File("./appspec.yml", b"version: 0.0\n", 0o644),
        T::File("./scripts/start.sh", b"#!/bin/sh\n", 0o755),
        T::Dir("./empty/"),
    ]);
    let u = c.run(&UnpackPolicy::default()).unwrap();
    assert_eq!((u.files, u.bytes), (2, 23));
    let d = c.dest();
    assert_eq!(fs::read(d.join("appspec.yml")).unwrap(), b"version: 0.0\n");
    assert_eq!(
        fs::metadata(d.join("scripts/start.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert!(d.join("empty").is_dir());

    let c = Case::zip(|z| {
        let o = zip::write::SimpleFileOptions::default();
        z.add_directory("site/", o).unwrap();
        z.start_file("site/index.html", o.unix_permissions(0o640))
            .unwrap();
        z.write_all(b"<h1>hi</h1>").unwrap();
    });
    let u = c.run(&UnpackPolicy::default()).unwrap();
    assert_eq!(u.files, 1);
    let f = c.dest().join("site/index.html");
    assert_eq!(fs::read(&f).unwrap(), b"<h1>hi</h1>");
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o640);
}

#[test]
fn bundle_type_is_detected_by_name_then_by_content() {
    let s = Scratch::new();
    let tar = tar_bytes(&[T::File("a", b"x", 0o644)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let tgz = gz.finish().unwrap();
    for (name, bytes, kind) in [
        ("b.tar", &tar, BundleType::Tar),
        ("b.tar.gz", &tgz, BundleType::Tgz),
        ("b.tgz", &tgz, BundleType::Tgz),
        ("plain-tar", &tar, BundleType::Tar),
        ("plain-gz", &tgz, BundleType::Tgz),
    ] {
        let p = s.path().join(name);
        fs::write(&p, bytes).unwrap();
        assert_eq!(
            pier_engine::bundle::unpack::detect_bundle_type(&p).unwrap(),
            kind,
            "{name}"
        );
    }
    assert_eq!(
        pier_engine::bundle::unpack::detect_bundle_type(s.path()).unwrap(),
        BundleType::Directory
    );
    let junk = s.write("junk.bin", "not an archive");
    assert!(matches!(
        pier_engine::bundle::unpack::detect_bundle_type(&junk),
        Err(UnpackError::Undetectable { .. })
    ));
}

#[test]
fn an_existing_destination_is_left_alone() {
    let c = Case::tar(&[T::File("a", b"x", 0o644)]);
    fs::create_dir_all(c.dest()).unwrap();
    fs::write(c.dest().join("keep"), "mine").unwrap();
    let err = c.run(&UnpackPolicy::default()).unwrap_err();
    assert!(matches!(err, UnpackError::DestExists { .. }), "{err}");
    assert_eq!(fs::read_to_string(c.dest().join("keep")).unwrap(), "mine");
}

#[test]
fn directory_bundle_is_hard_linked_not_copied() {
    let s = Scratch::new();
    let src = s.path().join("src");
    s.write("src/appspec.yml", "version: 0.0\n");
    s.script("src/scripts/start.sh", "#!/bin/sh\n");
    std::os::unix::fs::symlink("scripts/start.sh", src.join("start")).unwrap();
    let tool = s.write("src/bin/tool", "#!/bin/sh\n");
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();
    let dest = s.path().join("deploy/rev");

    let u = unpack(&src, BundleType::Directory, &dest, &UnpackPolicy::default()).unwrap();
    assert_eq!(u.files, 3);
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&src.join("appspec.yml")),
        ino(&dest.join("appspec.yml"))
    );
    assert_eq!(
        ino(&src.join("scripts/start.sh")),
        ino(&dest.join("scripts/start.sh"))
    );
    assert_eq!(
        fs::read_link(dest.join("start")).unwrap(),
        Path::new("scripts/start.sh")
    );
    // The set-uid file is copied so its bits can be cleared without touching the source.
    assert_ne!(ino(&tool), ino(&dest.join("bin/tool")));
    assert_eq!(fs::metadata(&tool).unwrap().mode() & 0o7777, 0o4755);
    assert_eq!(
        fs::metadata(dest.join("bin/tool")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        u.setid_entries,
        vec![("bin/tool".to_string(), S_IFREG | 0o4755)]
    );
}

#[test]
fn directory_bundle_with_a_fifo_is_refused() {
    let s = Scratch::new();
    let src = s.path().join("src");
    s.write("src/appspec.yml", "version: 0.0\n");
    nix::unistd::mkfifo(
        &src.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let dest = s.path().join("rev");
    let err = unpack(&src, BundleType::Directory, &dest, &UnpackPolicy::default()).unwrap_err();
    assert!(matches!(err, UnpackError::SpecialFile { .. }), "{err}");
    assert!(err.to_string().contains("pipe"), "{err}");
    assert!(!dest.exists());
}

/// A wide directory bundle's survey lists its directories ahead, several at a time: it still
/// refuses the bundle at the very entry its unpack does, wherever the cap falls, and still
/// counts every file of it.
#[test]
fn a_wide_directory_bundle_is_surveyed_whole_and_refused_like_its_unpack() {
    let s = Scratch::new();
    s.write("src/appspec.yml", "version: 0.0\n");
    for d in 0..12 {
        for f in 0..5 {
            s.write(&format!("src/d{d:02}/sub/f{f}"), "12345");
        }
    }
    let src = s.path().join("src");
    // 1 AppSpec + 12 × (directory, sub-directory, 5 files) = 85 entries.
    for max_entries in [3, 20, 50, 84] {
        let policy = UnpackPolicy {
            max_entries,
            ..UnpackPolicy::default()
        };
        let surveyed = survey_directory(&src, &policy).unwrap_err();
        assert!(
            matches!(surveyed, UnpackError::TooManyEntries { .. }),
            "{surveyed}"
        );
        let dest = s.path().join(format!("rev{max_entries}"));
        let unpacked = unpack(&src, BundleType::Directory, &dest, &policy).unwrap_err();
        assert_eq!(surveyed.to_string(), unpacked.to_string());
    }
    let policy = UnpackPolicy {
        max_entries: 85,
        ..UnpackPolicy::default()
    };
    match survey_directory(&src, &policy).unwrap() {
        Survey::InPlace { unpacked, .. } => {
            assert_eq!(unpacked.files, 61);
            assert_eq!(unpacked.bytes, 60 * 5 + "version: 0.0\n".len() as u64);
        }
        Survey::Snapshot(why) => panic!("the bundle must be read in place: {why}"),
    }
}

#[test]
fn directory_bundle_is_not_unpacked_into_itself() {
    let s = Scratch::new();
    let src = s.path().join("src");
    s.write("src/appspec.yml", "version: 0.0\n");
    let dest = src.join("deploy/rev");
    let err = unpack(&src, BundleType::Directory, &dest, &UnpackPolicy::default()).unwrap_err();
    assert!(matches!(err, UnpackError::DestInsideSource { .. }), "{err}");
    assert!(!src.join("deploy").exists());
}

#[test]
fn sparse_tar_entry_is_counted_at_its_real_size() {
    // A GNU sparse file: 512 bytes stored, 64 MiB once its holes are filled.
    let real: u64 = 64 << 20;
    let mut h = tar::Header::new_gnu();
    h.set_path("sparse.bin").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(real - 512);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(real);
    }
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &[7u8; 512][..]).unwrap();
    let s = Scratch::new();
    let archive = s.path().join("sparse.tar");
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    assert!(fs::metadata(&archive).unwrap().len() < 8192);
    let c = Case { s, archive };
    let policy = UnpackPolicy {
        max_total_bytes: 1 << 20,
        ..UnpackPolicy::default()
    };
    let err = c.run(&policy).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    c.nothing_left();
}

/// A GNU long-name header declaring megabytes of name: the tar reader would hold it all in
/// memory, so the stream itself is capped, not only the file data.
#[test]
fn huge_long_name_header_is_refused_without_reading_it_all() {
    let s = Scratch::new();
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let name_len: u64 = 8 << 20;
        let mut h = tar::Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(name_len);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, std::io::repeat(b'a').take(name_len)).unwrap();
        let body = b"x";
        let mut f = tar::Header::new_gnu();
        f.set_path("short").unwrap();
        f.set_size(1);
        f.set_mode(0o644);
        f.set_cksum();
        b.append(&f, &body[..]).unwrap();
        b.finish().unwrap();
    }
    let tgz = s.path().join("longname.tgz");
    let mut gz =
        flate2::write::GzEncoder::new(fs::File::create(&tgz).unwrap(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap();
    let policy = UnpackPolicy {
        max_total_bytes: 1 << 20,
        max_entries: 10,
    };
    let dest = s.path().join("out");
    let err = unpack(&tgz, BundleType::Tgz, &dest, &policy).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Tar {
                source: TarError::RecordTooLarge { declared, .. },
                ..
            } if declared == 8 << 20
        ),
        "{err}"
    );
    assert_eq!(err.to_string().len(), err.to_string().trim().len());
    assert!(!dest.exists());
}

/// A directory bundle's file that someone else could still change (another owner, or group-
/// or world-writable) is copied, not hard-linked: the revision keeps what was checked.
#[test]
fn directory_bundle_links_only_files_no_one_else_can_change() {
    crate::support::ensure_user("pier-e2e-bundle");
    let s = Scratch::new();
    let src = s.path().join("src");
    let mine = s.write("src/mine.sh", "#!/bin/sh\n");
    let open = s.write("src/open.sh", "#!/bin/sh\n");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
    let theirs = s.write("src/theirs.sh", "#!/bin/sh\n");
    let user = nix::unistd::User::from_name("pier-e2e-bundle")
        .unwrap()
        .unwrap();
    std::os::unix::fs::chown(&theirs, Some(user.uid.as_raw()), None).unwrap();
    let dest = s.path().join("rev");
    unpack(&src, BundleType::Directory, &dest, &UnpackPolicy::default()).unwrap();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&mine), ino(&dest.join("mine.sh")));
    assert_ne!(ino(&open), ino(&dest.join("open.sh")));
    assert_ne!(ino(&theirs), ino(&dest.join("theirs.sh")));
    assert_eq!(
        fs::read_to_string(dest.join("theirs.sh")).unwrap(),
        "#!/bin/sh\n"
    );
}
