//! Reading a tar stream member by member with every piece of metadata bounded before it is
//! read: the one tar reader that unpacking and `pier-agent validate` share.
//!
//! The `tar` crate, left to itself, reads a GNU long-name or long-link record and a pax
//! extended header whole into memory, whatever size its header declares: one record declaring
//! a gigabyte (a megabyte once gzipped) costs a gigabyte of memory. So the crate is used in
//! *raw* mode, which hands over every record as it is, and this module applies those records
//! itself, checking each one's declared size against [`MAX_NAME_BYTES`] or [`MAX_PAX_BYTES`]
//! from its header before a byte of it is read. A member's name (however it was given) is
//! also capped at [`MAX_NAME_BYTES`].
//!
//! Raw mode leaves two things to us that the crate would otherwise do: GNU sparse files (read
//! here when their map fits in the header, refused when it needs extension blocks) and a pax
//! `size` record (refused unless it agrees with the header: two readers that disagree about
//! where a member ends would see two different archives).

use std::io::{self, Read};

use pier_protocol::quote::{self, quote_bytes};

/// Cap on an entry's name or link target in bytes, however it is given (ustar header, GNU
/// long-name or long-link record, pax `path` or `linkpath`). Linux's PATH_MAX.
pub const MAX_NAME_BYTES: u64 = 4096;
/// Cap on one pax extended header, local or global.
pub const MAX_PAX_BYTES: u64 = 64 * 1024;

/// Why a tar stream was refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// A metadata record declares more than its cap.
    #[error(
        "{record} {after} declares {declared} bytes, over the cap of {limit} bytes for one; \
         a bundle's names and headers are small, so this archive is refused unread"
    )]
    RecordTooLarge {
        /// What kind of record ("GNU long-name record", "pax extended header", ...).
        record: &'static str,
        /// Where it is: after which entry, quoted for a message.
        after: String,
        /// The size its header declares.
        declared: u64,
        /// The cap.
        limit: u64,
    },
    /// A member's name or link target (from a pax header) is longer than [`MAX_NAME_BYTES`].
    #[error("entry {entry} has a {what} of {len} bytes, over the cap of {limit} bytes")]
    NameTooLong {
        /// The entry, quoted and cut.
        entry: String,
        /// "name" or "link target".
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        limit: u64,
    },
    /// A feature the reader does not take from a bundle.
    #[error("entry {entry}: {what} is not supported in a bundle; rebuild the archive without it")]
    Unsupported {
        /// The entry, quoted and cut.
        entry: String,
        /// What it uses.
        what: &'static str,
    },
    /// The stream is not a well-formed tar archive.
    #[error("{0}")]
    Malformed(String),
    /// Reading the stream failed (including a cap of the caller's reader).
    #[error("{0}")]
    Read(#[source] io::Error),
}

/// How much of a reader's message a [`TarError::Malformed`] keeps.
const MAX_DETAIL_CHARS: usize = 300;

impl TarError {
    fn malformed(what: impl std::fmt::Display) -> TarError {
        TarError::Malformed(quote::bounded(&what.to_string(), MAX_DETAIL_CHARS))
    }
}

/// One archive member with its long name, long link and pax records applied.
pub struct Member<'a> {
    /// The name as the archive gives it (at most [`MAX_NAME_BYTES`]).
    pub name: &'a [u8],
    /// The link target of a symlink or hard link.
    pub link: Option<&'a [u8]>,
    /// The member's type.
    pub entry_type: tar::EntryType,
    /// Mode bits from the header (0o644 when unreadable).
    pub mode: u32,
    /// How many bytes `data` yields: for a sparse file, its size with the holes filled.
    pub size: u64,
    /// The member's contents.
    pub data: &'a mut dyn Read,
}

/// Calls `each` for every member of the tar stream `reader`, in order. Metadata records
/// (long names, pax headers) are applied, not passed on; every one is checked against its
/// cap before it is read.
pub fn for_each_member<R, E>(
    reader: R,
    mut each: impl FnMut(Member<'_>) -> Result<(), E>,
) -> Result<(), E>
where
    R: Read,
    E: From<TarError>,
{
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(TarError::Read)?.raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    // The last member's name, so a refusal can say where in the archive it is.
    let mut last: Option<Vec<u8>> = None;
    for item in entries {
        let mut entry = item.map_err(TarError::Read)?;
        let entry_type = entry.header().entry_type();
        let record = match entry_type {
            tar::EntryType::GNULongName => Some(("GNU long-name record", MAX_NAME_BYTES)),
            tar::EntryType::GNULongLink => Some(("GNU long-link record", MAX_NAME_BYTES)),
            tar::EntryType::XHeader => Some(("pax extended header", MAX_PAX_BYTES)),
            tar::EntryType::XGlobalHeader => Some(("pax global header", MAX_PAX_BYTES)),
            _ => None,
        };
        if let Some((record, limit)) = record {
            let declared = entry.size();
            if declared > limit {
                return Err(TarError::RecordTooLarge {
                    record,
                    after: match &last {
                        Some(n) => format!("after entry {}", quote_bytes(n)),
                        None => "at the start of the archive".to_string(),
                    },
                    declared,
                    limit,
                }
                .into());
            }
            let mut body = Vec::with_capacity(declared as usize);
            (&mut entry)
                .take(limit)
                .read_to_end(&mut body)
                .map_err(TarError::Read)?;
            let slot = match entry_type {
                tar::EntryType::GNULongName => &mut long_name,
                tar::EntryType::GNULongLink => &mut long_link,
                tar::EntryType::XHeader => &mut pax,
                // Global headers set defaults (mtimes, owners) that pier does not use.
                _ => continue,
            };
            if slot.is_some() {
                return Err(
                    TarError::malformed(format_args!("two {record}s describe one entry")).into(),
                );
            }
            if entry_type != tar::EntryType::XHeader {
                // GNU tar ends the name with a NUL.
                while body.last() == Some(&0) {
                    body.pop();
                }
            }
            *slot = Some(body);
            continue;
        }

        let header = entry.header().clone();
        let mut name = header.path_bytes().into_owned();
        let mut link = header.link_name_bytes().map(|l| l.into_owned());
        let declared = entry.size();
        if let Some(p) = pax.take() {
            for ext in tar::PaxExtensions::new(&p) {
                let ext = ext.map_err(|e| TarError::malformed(format_args!("pax header: {e}")))?;
                match ext.key_bytes() {
                    b"path" => name = ext.value_bytes().to_vec(),
                    b"linkpath" => link = Some(ext.value_bytes().to_vec()),
                    b"size" => {
                        let agrees = ext
                            .value()
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                            .is_some_and(|v| v == declared);
                        if !agrees {
                            return Err(TarError::Unsupported {
                                entry: quote_bytes(&name),
                                what: "a pax size record that differs from the header",
                            }
                            .into());
                        }
                    }
                    k if k.starts_with(b"GNU.sparse.") => {
                        return Err(TarError::Unsupported {
                            entry: quote_bytes(&name),
                            what: "a pax-format sparse file",
                        }
                        .into())
                    }
                    _ => {}
                }
            }
        }
        if let Some(n) = long_name.take() {
            name = n;
        }
        if let Some(l) = long_link.take() {
            link = Some(l);
        }
        for (what, bytes) in [("name", Some(&name)), ("link target", link.as_ref())] {
            if let Some(b) = bytes.filter(|b| b.len() as u64 > MAX_NAME_BYTES) {
                return Err(TarError::NameTooLong {
                    entry: quote_bytes(&name),
                    what,
                    len: b.len(),
                    limit: MAX_NAME_BYTES,
                }
                .into());
            }
        }
        let mode = header.mode().unwrap_or(0o644);
        let is_link = matches!(entry_type, tar::EntryType::Symlink | tar::EntryType::Link);
        let link = if is_link { link } else { None };
        if entry_type == tar::EntryType::GNUSparse {
            let mut sparse = Sparse::new(&header, &name, declared, &mut entry)?;
            each(Member {
                name: &name,
                link: None,
                entry_type,
                mode,
                size: sparse.real_size,
                data: &mut sparse,
            })?;
        } else {
            each(Member {
                name: &name,
                link: link.as_deref(),
                entry_type,
                mode,
                size: declared,
                data: &mut entry,
            })?;
        }
        last = Some(name);
    }
    if long_name.is_some() || long_link.is_some() || pax.is_some() {
        return Err(TarError::malformed(
            "the archive ends after a long-name or pax record, with no entry for it",
        )
        .into());
    }
    Ok(())
}

/// A GNU sparse file whose map fits in its header: its data blocks with the holes between
/// them read as zeros.
struct Sparse<'r> {
    /// (is a hole, length) in file order.
    segments: std::collections::VecDeque<(bool, u64)>,
    real_size: u64,
    inner: &'r mut dyn Read,
}

impl<'r> Sparse<'r> {
    fn new(
        header: &tar::Header,
        name: &[u8],
        stored: u64,
        inner: &'r mut dyn Read,
    ) -> Result<Self, TarError> {
        let bad =
            |what: &str| TarError::malformed(format_args!("entry {}: {what}", quote_bytes(name)));
        let gnu = header
            .as_gnu()
            .ok_or_else(|| bad("a sparse entry without a GNU header"))?;
        if gnu.is_extended() {
            return Err(TarError::Unsupported {
                entry: quote_bytes(name),
                what: "a sparse file of more than four data blocks",
            });
        }
        let real_size = gnu.real_size().map_err(|_| bad("unreadable sparse size"))?;
        let mut segments = std::collections::VecDeque::new();
        let (mut at, mut data) = (0u64, 0u64);
        for block in gnu.sparse.iter().filter(|b| !b.is_empty()) {
            let off = block.offset().map_err(|_| bad("unreadable sparse map"))?;
            let len = block.length().map_err(|_| bad("unreadable sparse map"))?;
            if off < at {
                return Err(bad("sparse blocks out of order"));
            }
            segments.push_back((true, off - at));
            segments.push_back((false, len));
            at = off
                .checked_add(len)
                .ok_or_else(|| bad("sparse map overflows"))?;
            data = data.saturating_add(len);
        }
        if data != stored || at > real_size {
            return Err(bad("sparse map does not match the sizes in its header"));
        }
        segments.push_back((true, real_size - at));
        Ok(Sparse {
            segments,
            real_size,
            inner,
        })
    }
}

impl Read for Sparse<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(&mut (hole, ref mut left)) = self.segments.front_mut() {
            if *left == 0 {
                self.segments.pop_front();
                continue;
            }
            let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            let n = if hole {
                buf[..want].fill(0);
                want
            } else {
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the archive ends inside a sparse file",
                    ));
                }
                n
            };
            *left -= n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}
