//! Why a lifecycle event failed, for a program to act on: CodeDeploy's lifecycle-event
//! diagnostics (`errorCode`, `scriptName`, `message`, `logTail`), with pier's own codes for
//! failures CodeDeploy has no code for.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A machine-readable cause of a failed lifecycle event. The first five are CodeDeploy's
/// values, spelled as CodeDeploy spells them; the rest are pier's own. A reader that meets a
/// code it does not know should treat it as [`ErrorCode::UnknownError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The AppSpec names a script that is not in the bundle.
    ScriptMissing,
    /// The script is there but cannot be executed (mode, interpreter, `runas` user).
    ScriptNotExecutable,
    /// The script ran past its `timeout` and was stopped.
    ScriptTimedOut,
    /// The script exited non-zero or was killed by a signal.
    ScriptFailed,
    /// Anything that has no better code.
    UnknownError,
    /// The bundle was refused or could not be unpacked (an entry that escapes, a device
    /// node, a size or entry cap, a corrupt archive).
    BundleRefused,
    /// The revision could not be fetched (S3, HTTP(S), GitHub or a local path).
    BundleDownloadFailed,
    /// The fetched bundle's SHA-256 (or S3 ETag) is not the one the command names.
    ChecksumMismatch,
    /// The bundle's AppSpec is missing or invalid.
    AppSpecInvalid,
    /// Install met a file it may not replace (`file_exists_behavior: DISALLOW`).
    FileExists,
    /// Install could not place a file, directory or permission for another reason.
    InstallFailed,
    /// The agent stopped (crash, kill, shutdown) while the event ran.
    AgentInterrupted,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ScriptMissing => "ScriptMissing",
            ErrorCode::ScriptNotExecutable => "ScriptNotExecutable",
            ErrorCode::ScriptTimedOut => "ScriptTimedOut",
            ErrorCode::ScriptFailed => "ScriptFailed",
            ErrorCode::UnknownError => "UnknownError",
            ErrorCode::BundleRefused => "BundleRefused",
            ErrorCode::BundleDownloadFailed => "BundleDownloadFailed",
            ErrorCode::ChecksumMismatch => "ChecksumMismatch",
            ErrorCode::AppSpecInvalid => "AppSpecInvalid",
            ErrorCode::FileExists => "FileExists",
            ErrorCode::InstallFailed => "InstallFailed",
            ErrorCode::AgentInterrupted => "AgentInterrupted",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cause of a failed lifecycle event, beside the message a person reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// What kind of failure this is.
    pub error_code: ErrorCode,
    /// The script (AppSpec `location`) concerned, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_name: Option<String>,
    /// A sentence on what went wrong.
    pub message: String,
    /// The last few KiB of the event's script output, when it ran one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_written_as_codedeploy_spells_them() {
        let d = Diagnostics {
            error_code: ErrorCode::ScriptTimedOut,
            script_name: Some("scripts/start.sh".into()),
            message: "timed out".into(),
            log_tail: None,
        };
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(v["error_code"], "ScriptTimedOut");
        assert_eq!(v["script_name"], "scripts/start.sh");
        assert!(v.get("log_tail").is_none());
        for c in [
            ErrorCode::ScriptMissing,
            ErrorCode::AgentInterrupted,
            ErrorCode::FileExists,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
