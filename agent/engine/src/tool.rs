//! Running the host tools the engine needs (`setfacl`, `chcon`): each run is bounded in
//! time. A tool that hangs (an NFS mount that stopped answering, a wedged SELinux daemon) is
//! killed with its whole process group at the limit, and the error names the tool and the
//! path it was working on, instead of holding a deployment, and its group lock, for ever.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long one run of a host tool may take before it is killed.
pub(crate) const TOOL_TIME_LIMIT: Duration = Duration::from_secs(60);

/// At most this much of a tool's stderr is kept for the error message.
const STDERR_KEEP: u64 = 16 * 1024;

/// Why a tool run did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    /// The tool could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// The tool was still running at its limit and was killed.
    #[error("{tool} did not finish within {limit:?} and was killed")]
    TimedOut { tool: String, limit: Duration },
    /// The tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// Runs `cmd` to its end within `limit` (stdin and stdout closed, stderr kept for the
/// error). The tool runs in its own process group, and at the limit the whole group is
/// killed, so a grandchild holding stderr cannot keep the caller waiting either.
/// Blocking: call it from a blocking context.
pub(crate) fn run(cmd: &mut Command, limit: Duration) -> Result<(), ToolError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ToolError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    let stderr = child.stderr.take().map(|pipe| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut pipe = pipe;
            let _ = pipe.by_ref().take(STDERR_KEEP).read_to_end(&mut kept);
            // Drain the rest so the tool never blocks on a full pipe.
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            kept
        })
    });
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(ToolError::Spawn {
                    tool: tool.clone(),
                    source,
                })
            }
        }
    };
    // Whether it ended or not, nothing of its group may outlive the run: a leftover child
    // would keep stderr open and the reader waiting.
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.wait();
            if let Some(reader) = stderr {
                let _ = reader.join();
            }
            return Err(ToolError::TimedOut { tool, limit });
        }
    };
    let stderr = stderr
        .and_then(|r| r.join().ok())
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(ToolError::Failed {
            tool,
            status,
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A hung `setfacl` (here a script that sleeps, with a child holding stderr) is killed at
    /// the limit, and the error names it.
    #[test]
    fn a_hung_tool_is_killed_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let setfacl = script(dir.path(), "setfacl", "sleep 600 &\nsleep 600");
        let started = Instant::now();
        let err = run(Command::new(&setfacl).arg("-b"), Duration::from_millis(300)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, ToolError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("setfacl"), "{err}");
    }

    #[test]
    fn a_failing_tool_reports_its_stderr_and_a_good_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let bad = script(dir.path(), "bad", "echo 'no such file' >&2; exit 2");
        let err = run(&mut Command::new(&bad), TOOL_TIME_LIMIT).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        let good = script(dir.path(), "good", "exit 0");
        run(&mut Command::new(&good), TOOL_TIME_LIMIT).unwrap();
    }
}
