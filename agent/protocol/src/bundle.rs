//! Bundle types: the one place that names them (`tar`, `tgz`, `zip`, `directory`, as
//! `codedeploy-local -t` does) and tells one from a file name or a file's first bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kinds of bundle `codedeploy-local -t` knows (in JSON: their lower-case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleType {
    /// A plain directory.
    Directory,
    /// An uncompressed tar archive.
    Tar,
    /// A gzip-compressed tar archive.
    Tgz,
    /// A zip archive.
    Zip,
}

/// A bundle type word that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown bundle type `{}`: use tar, tgz, zip or directory", .0.chars().take(64).collect::<String>())]
pub struct UnknownBundleType(pub String);

/// How many leading bytes [`BundleType::from_magic`] needs to tell every archive kind.
pub const MAGIC_LEN: usize = 262;

impl BundleType {
    /// The word for this type (`tgz`, ...), as in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BundleType::Directory => "directory",
            BundleType::Tar => "tar",
            BundleType::Tgz => "tgz",
            BundleType::Zip => "zip",
        }
    }

    /// The archive type a file name implies (`.tar`, `.tar.gz` or `.tgz`, `.zip`, in any
    /// case), if any.
    pub fn from_file_name(name: &str) -> Option<BundleType> {
        let n = name.to_ascii_lowercase();
        if n.ends_with(".tar") {
            Some(BundleType::Tar)
        } else if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
            Some(BundleType::Tgz)
        } else if n.ends_with(".zip") {
            Some(BundleType::Zip)
        } else {
            None
        }
    }

    /// The archive type a file's first bytes show (gzip, a zip local or empty-archive header,
    /// a ustar header), if any. Give at least [`MAGIC_LEN`] bytes when the file has them.
    pub fn from_magic(head: &[u8]) -> Option<BundleType> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(BundleType::Tgz)
        } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(BundleType::Zip)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(BundleType::Tar)
        } else {
            None
        }
    }
}

impl FromStr for BundleType {
    type Err = UnknownBundleType;

    /// The words of `codedeploy-local -t`, plus `tar.gz` for `tgz`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "directory" => Ok(BundleType::Directory),
            "tar" => Ok(BundleType::Tar),
            "tgz" | "tar.gz" => Ok(BundleType::Tgz),
            "zip" => Ok(BundleType::Zip),
            _ => Err(UnknownBundleType(s.to_string())),
        }
    }
}

impl fmt::Display for BundleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_words_agree() {
        for t in [
            BundleType::Directory,
            BundleType::Tar,
            BundleType::Tgz,
            BundleType::Zip,
        ] {
            assert_eq!(t.as_str().parse::<BundleType>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        assert_eq!(
            BundleType::from_file_name("A.TAR.GZ"),
            Some(BundleType::Tgz)
        );
        assert_eq!(BundleType::from_file_name("a.tgz"), Some(BundleType::Tgz));
        assert_eq!(BundleType::from_file_name("a.tar"), Some(BundleType::Tar));
        assert_eq!(BundleType::from_file_name("a.zip"), Some(BundleType::Zip));
        assert_eq!(BundleType::from_file_name("appspec.yml"), None);
        assert!("rar".parse::<BundleType>().is_err());
    }

    #[test]
    fn magic_bytes_tell_each_archive() {
        assert_eq!(
            BundleType::from_magic(&[0x1f, 0x8b, 8]),
            Some(BundleType::Tgz)
        );
        assert_eq!(
            BundleType::from_magic(b"PK\x03\x04rest"),
            Some(BundleType::Zip)
        );
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(BundleType::from_magic(&tar), Some(BundleType::Tar));
        assert_eq!(BundleType::from_magic(b"version: 0.0\n"), None);
    }
}
