//! Everything read from an archive is bounded: GNU long-name/long-link records, pax headers
//! and zip names and extra fields have small caps checked before their data is read; names in
//! refusals are escaped and cut; names that are not UTF-8 are refused, never a panic. The
//! property tests feed arbitrary bytes and arbitrary tar headers to the reader.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use pier_engine::bundle::tar_stream::{TarError, MAX_NAME_BYTES, MAX_PAX_BYTES};
use pier_engine::bundle::unpack::{unpack, BundleType, UnpackError, UnpackPolicy};
use proptest::prelude::*;

use crate::support::Scratch;

/// The longest error these tests accept: a refusal names one entry, cut to 200 characters.
const MAX_ERROR_LEN: usize = 1024;

/// A tar header of any type with raw name bytes and a declared size, checksummed.
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let n = name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

/// A tgz whose first record declares `size` bytes of `kind` (then as many zeros as
/// `body` says, gzipped as they stream, never held whole).
fn tgz_with_record(path: &Path, kind: tar::EntryType, size: u64, body: u64) {
    let mut gz =
        flate2::write::GzEncoder::new(fs::File::create(path).unwrap(), flate2::Compression::fast());
    gz.write_all(raw_header(b"././@LongLink", kind, size).as_bytes())
        .unwrap();
    std::io::copy(&mut std::io::repeat(0).take(body), &mut gz).unwrap();
    gz.finish().unwrap();
}

fn unpack_err(s: &Scratch, archive: &Path, kind: BundleType) -> UnpackError {
    let dest = s.path().join("rev");
    let err = unpack(archive, kind, &dest, &UnpackPolicy::default()).unwrap_err();
    assert!(!dest.exists(), "a refusal left {}", dest.display());
    let msg = err.to_string();
    assert!(msg.len() < MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
    err
}

#[test]
fn metadata_records_past_their_caps_are_refused_from_the_header() {
    for (kind, limit) in [
        (tar::EntryType::GNULongName, MAX_NAME_BYTES),
        (tar::EntryType::GNULongLink, MAX_NAME_BYTES),
        (tar::EntryType::XHeader, MAX_PAX_BYTES),
        (tar::EntryType::XGlobalHeader, MAX_PAX_BYTES),
    ] {
        let s = Scratch::new();
        let tgz = s.path().join("b.tgz");
        // Declares a gigabyte; carries only a few blocks of it, so a reader that tried to
        // read the record would fail on a truncated archive instead of refusing it.
        tgz_with_record(&tgz, kind, 1 << 30, 4096);
        let err = unpack_err(&s, &tgz, BundleType::Tgz);
        assert!(
            matches!(
                &err,
                UnpackError::Tar {
                    source: TarError::RecordTooLarge { declared, limit: l, .. },
                    ..
                } if *declared == 1 << 30 && *l == limit
            ),
            "{kind:?}: {err}"
        );
        // Just over the cap is refused too; at the cap is read.
        let tgz = s.path().join("c.tgz");
        tgz_with_record(&tgz, kind, limit + 1, limit + 1024);
        let err = unpack_err(&s, &tgz, BundleType::Tgz);
        assert!(matches!(err, UnpackError::Tar { .. }), "{kind:?}: {err}");
    }
}

#[test]
fn long_names_within_the_cap_install_through_gnu_and_pax_records() {
    let s = Scratch::new();
    let long = format!("{}/file.txt", "d".repeat(250));
    let tar = s.path().join("b.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"hi"[..]).unwrap(); // GNU long name
        let pax_name = format!("{}/{}/p.txt", "e".repeat(200), "f".repeat(150));
        b.append_pax_extensions([("path", pax_name.as_bytes())])
            .unwrap();
        let mut h = raw_header(b"short", tar::EntryType::Regular, 2);
        h.set_cksum();
        b.append(&h, &b"yo"[..]).unwrap();
        b.finish().unwrap();
    }
    let dest = s.path().join("rev");
    unpack(&tar, BundleType::Tar, &dest, &UnpackPolicy::default()).unwrap();
    assert_eq!(fs::read(dest.join(&long)).unwrap(), b"hi");
    let pax = dest.join(format!("{}/{}/p.txt", "e".repeat(200), "f".repeat(150)));
    assert_eq!(fs::read(pax).unwrap(), b"yo");
    assert!(!dest.join("short").exists(), "the pax path was not applied");
}

#[test]
fn a_pax_name_past_the_name_cap_is_refused_with_the_name_cut() {
    let s = Scratch::new();
    let tar = s.path().join("b.tar");
    let name = "n".repeat(MAX_NAME_BYTES as usize + 1);
    {
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        b.append_pax_extensions([("path", name.as_bytes())])
            .unwrap();
        b.append(&raw_header(b"x", tar::EntryType::Regular, 0), &b""[..])
            .unwrap();
        b.finish().unwrap();
    }
    let err = unpack_err(&s, &tar, BundleType::Tar);
    assert!(
        matches!(
            err,
            UnpackError::Tar {
                source: TarError::NameTooLong { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("nnnn…\""), "{err}");
}

#[test]
fn a_pax_size_that_disagrees_with_the_header_is_refused() {
    let s = Scratch::new();
    let tar = s.path().join("b.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        b.append_pax_extensions([("size", &b"1024"[..])]).unwrap();
        b.append(&raw_header(b"x", tar::EntryType::Regular, 0), &b""[..])
            .unwrap();
        b.finish().unwrap();
    }
    let err = unpack_err(&s, &tar, BundleType::Tar);
    assert!(
        matches!(
            err,
            UnpackError::Tar {
                source: TarError::Unsupported { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn names_in_refusals_are_escaped_and_cut() {
    let s = Scratch::new();
    let tar = s.path().join("b.tar");
    // A GNU long name of 4000 bytes with a terminal escape, climbing out with `..`.
    let mut name = b"\x1b[2J".to_vec();
    name.extend(std::iter::repeat_n(b'a', 3990));
    name.extend_from_slice(b"/../../x");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        let mut ln = raw_header(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            name.len() as u64,
        );
        ln.set_cksum();
        b.append(&ln, &name[..]).unwrap();
        b.append(&raw_header(b"x", tar::EntryType::Regular, 0), &b""[..])
            .unwrap();
        b.finish().unwrap();
    }
    let err = unpack_err(&s, &tar, BundleType::Tar);
    assert!(matches!(err, UnpackError::ParentDir { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("\"\\u{1b}[2Jaaa"), "{msg}");
    assert!(msg.contains("…\""), "{msg}");
    assert!(!msg.contains('\x1b'), "{msg}");
}

#[test]
fn a_tar_name_that_is_not_utf8_is_refused_naming_it_escaped() {
    let s = Scratch::new();
    let tar = s.path().join("b.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
        b.append(
            &raw_header(b"app/caf\xe9.txt", tar::EntryType::Regular, 1),
            &b"x"[..],
        )
        .unwrap();
        b.finish().unwrap();
    }
    let err = unpack_err(&s, &tar, BundleType::Tar);
    assert!(matches!(err, UnpackError::NotUtf8 { .. }), "{err}");
    assert!(err.to_string().contains("\"app/caf\\xe9.txt\""), "{err}");
}

#[test]
fn a_directory_bundle_name_that_is_not_utf8_is_refused() {
    let s = Scratch::new();
    let src = s.path().join("src");
    s.write("src/appspec.yml", "version: 0.0\nos: linux\n");
    fs::write(src.join(std::ffi::OsStr::from_bytes(b"bad\xff")), "x").unwrap();
    let err = unpack_err(&s, &src, BundleType::Directory);
    assert!(matches!(err, UnpackError::NotUtf8 { .. }), "{err}");
    assert!(err.to_string().contains("bad\\xff"), "{err}");
}

#[test]
fn a_zip_entry_with_a_huge_extra_field_is_refused() {
    let s = Scratch::new();
    let archive = s.path().join("b.zip");
    {
        let mut z = zip::ZipWriter::new(fs::File::create(&archive).unwrap());
        let mut opts = zip::write::FullFileOptions::default();
        opts.add_extra_field(0x6d6b, vec![7u8; 60_000], false)
            .unwrap();
        z.start_file("big-extra.txt", opts).unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
    }
    let err = unpack_err(&s, &archive, BundleType::Zip);
    assert!(
        matches!(
            err,
            UnpackError::ZipField {
                what: "extra field",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("\"big-extra.txt\""), "{err}");
}

/// How many cases each property runs: `PROPTEST_CASES`, else a number CI can afford.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// Unpacks `bytes` as `kind`; whatever happens, there is no panic, and an error is short.
fn unpack_anything(bytes: &[u8], kind: BundleType) {
    let s = Scratch::new();
    let archive = s.path().join("fuzz");
    fs::write(&archive, bytes).unwrap();
    let policy = UnpackPolicy {
        max_total_bytes: 1 << 20,
        max_entries: 64,
    };
    if let Err(e) = unpack(&archive, kind, &s.path().join("rev"), &policy) {
        let msg = e.to_string();
        assert!(msg.len() < MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
    }
}

fn entry_type() -> impl Strategy<Value = u8> {
    prop::sample::select(
        &[
            b'0', b'1', b'2', b'3', b'5', b'6', b'7', b'L', b'K', b'x', b'g', b'S', b'V', 0,
        ][..],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        for kind in [BundleType::Tar, BundleType::Tgz, BundleType::Zip] {
            unpack_anything(&bytes, kind);
        }
    }

    /// Headers of any type, any declared size (up to a terabyte), any name bytes, followed by
    /// a little data: a reader that buffered what a header declares would run out of memory.
    #[test]
    fn arbitrary_tar_headers_never_panic_or_buffer(
        records in prop::collection::vec(
            (
                entry_type(),
                prop::collection::vec(any::<u8>(), 1..120),
                prop_oneof![0u64..2048, Just(1u64 << 40), any::<u32>().prop_map(u64::from)],
                0usize..1024,
            ),
            1..6,
        )
    ) {
        let mut bytes = Vec::new();
        for (kind, name, size, data) in records {
            bytes.extend_from_slice(
                raw_header(&name, tar::EntryType::new(kind), size).as_bytes(),
            );
            bytes.extend(std::iter::repeat_n(b'z', data.div_ceil(512) * 512));
        }
        unpack_anything(&bytes, BundleType::Tar);
    }
}
