//! What happens to a script's output: the raw bytes of stdout and stderr are cut into lines
//! (a line longer than [`MAX_LINE`] is cut, so a script that prints megabytes without a
//! newline cannot grow memory), cleaned of ANSI escapes and terminal control characters,
//! written to the [`ScriptLog`] and kept in a bounded [`Tail`] for the status report.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::scriptlog::ScriptLog;

/// Longest line kept whole; longer output without a newline is split into lines of this size.
pub(crate) const MAX_LINE: usize = 8 * 1024;

/// Size of the output tail reported with the hook's outcome.
pub(crate) const TAIL_BYTES: usize = 4 * 1024;

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// Cuts a byte stream into lines without ever holding more than [`MAX_LINE`] bytes.
#[derive(Default)]
pub(crate) struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `chunk`; calls `emit` for every complete (or over-long) line, without its `\n`.
    pub(crate) fn push(&mut self, chunk: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &rest[..rest.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&window[..i]);
                    emit(&self.pending);
                    self.pending.clear();
                    rest = &rest[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    rest = &rest[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        emit(&self.pending);
                        self.pending.clear();
                    }
                }
            }
        }
    }

    /// Emits what is left after the last newline (output that did not end with one).
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// Turns one raw output line into plain text: ANSI/VT escape sequences removed, a carriage
/// return treated as a terminal would (only what was written after the last one is visible,
/// which also drops the `\r` of CRLF), other control characters except tab removed, invalid
/// UTF-8 replaced.
pub(crate) fn clean_line(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != 0x1b {
            out.push(b);
            i += 1;
            continue;
        }
        i += 1;
        match raw.get(i) {
            // CSI: parameters and intermediates up to a final byte in 0x40..=0x7e.
            Some(b'[') => {
                i += 1;
                while i < raw.len() && !(0x40..=0x7e).contains(&raw[i]) {
                    i += 1;
                }
                i += 1;
            }
            // OSC, DCS, SOS, PM, APC: a string ended by BEL or ST (ESC \).
            Some(b']' | b'P' | b'X' | b'^' | b'_') => {
                i += 1;
                while i < raw.len() {
                    if raw[i] == 0x07 {
                        i += 1;
                        break;
                    }
                    if raw[i] == 0x1b && raw.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            // Other escapes: optional intermediates, then one final byte.
            Some(_) => {
                while i < raw.len() && (0x20..=0x2f).contains(&raw[i]) {
                    i += 1;
                }
                i += 1;
            }
            None => {}
        }
    }
    let visible = match out.split(|&b| b == b'\r').rev().find(|s| !s.is_empty()) {
        Some(s) => s,
        None => &[],
    };
    let kept: Vec<u8> = visible
        .iter()
        .copied()
        .filter(|&b| b == b'\t' || !(b < 0x20 || b == 0x7f))
        .collect();
    String::from_utf8_lossy(&kept).into_owned()
}

/// The last [`TAIL_BYTES`] of a hook's output, both streams in the order they were read.
#[derive(Default, Debug)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    pub(crate) fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.bytes > TAIL_BYTES && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len() + 1;
            }
        }
    }

    /// The tail as text, at most [`TAIL_BYTES`] long (a single over-long last line is cut at
    /// its start, on a character boundary).
    pub(crate) fn render(&self) -> String {
        let all = self
            .lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        if all.len() <= TAIL_BYTES {
            return all;
        }
        let mut start = all.len() - TAIL_BYTES;
        while !all.is_char_boundary(start) {
            start += 1;
        }
        all[start..].to_string()
    }
}

/// Copies one pipe of a running hook into the log and the tail, line by line, until EOF.
///
/// It runs as its own task so that the hook can end when the script ends even if a child the
/// script left behind keeps the pipe open: the runner then clears `attached` and stops waiting
/// for this task, which keeps copying that child's output to the log (marked as after exit)
/// instead of closing the pipe under it, which would kill it with SIGPIPE on its next write.
pub(crate) struct Pump {
    pub(crate) stream: Stream,
    pub(crate) event: Arc<str>,
    pub(crate) location: Arc<str>,
    pub(crate) log: ScriptLog,
    pub(crate) tail: Arc<Mutex<Tail>>,
    pub(crate) attached: Arc<AtomicBool>,
}

impl Pump {
    pub(crate) async fn run(self, mut pipe: impl AsyncRead + Unpin) {
        let mut splitter = LineSplitter::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut log_failed = false;
        loop {
            let n = match pipe.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    log::warn!(
                        "reading {} of hook {} ({}) failed: {e}",
                        self.stream,
                        self.location,
                        self.event
                    );
                    break;
                }
            };
            let mut entries = Vec::new();
            splitter.push(&buf[..n], |raw| entries.push(self.line(raw)));
            self.write(entries, &mut log_failed).await;
        }
        let mut entries = Vec::new();
        splitter.finish(|raw| entries.push(self.line(raw)));
        self.write(entries, &mut log_failed).await;
    }

    /// Appends `entries` to the script log on the blocking pool (a write may rotate files).
    async fn write(&self, entries: Vec<String>, log_failed: &mut bool) {
        if entries.is_empty() {
            return;
        }
        let log = self.log.clone();
        let written =
            tokio::task::spawn_blocking(move || entries.iter().try_for_each(|e| log.line(e)))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = written {
            // Losing the log must not fail the deployment; say so once per stream.
            if !*log_failed {
                log::warn!(
                    "cannot write to script log {}: {e}; further output of {} is not logged",
                    self.log.path().display(),
                    self.location
                );
                *log_failed = true;
            }
        }
    }

    /// Keeps `raw` in the tail (while the script runs) and returns its script-log entry.
    fn line(&self, raw: &[u8]) -> String {
        let text = clean_line(raw);
        let attached = self.attached.load(Ordering::Acquire);
        let marker = if attached { "" } else { " after exit" };
        if attached {
            let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
            tail.push(format!("[{}] {text}", self.stream));
        }
        format!(
            "[{}] [{}{marker}] {}: {text}",
            self.event, self.stream, self.location
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        for c in chunks {
            s.push(c, |l| lines.push(l.to_vec()));
        }
        s.finish(|l| lines.push(l.to_vec()));
        lines
    }

    #[test]
    fn splits_across_chunks() {
        let lines = split(&[b"he", b"llo\nwor", b"ld\n\nlast"]);
        assert_eq!(
            lines,
            vec![
                b"hello".to_vec(),
                b"world".to_vec(),
                vec![],
                b"last".to_vec()
            ]
        );
    }

    #[test]
    fn long_line_is_cut_not_buffered() {
        let big = vec![b'a'; MAX_LINE * 3 + 5];
        let lines = split(&[&big[..1000], &big[1000..], b"\n"]);
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        assert_eq!(lines[3].len(), 5);
    }

    #[test]
    fn strips_ansi_and_controls() {
        assert_eq!(clean_line(b"\x1b[1;31mred\x1b[0m plain"), "red plain");
        assert_eq!(clean_line(b"\x1b]0;title\x07text"), "text");
        assert_eq!(
            clean_line(b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\"),
            "link"
        );
        assert_eq!(clean_line(b"\x1b(Bok\x1b"), "ok");
        assert_eq!(clean_line(b"crlf\r"), "crlf");
        assert_eq!(clean_line(b" 10%\r 50%\r100%"), "100%");
        assert_eq!(clean_line(b"a\tb\x07\x08c"), "a\tbc");
        assert_eq!(clean_line("héllo".as_bytes()), "héllo");
    }

    #[test]
    fn tail_is_bounded_and_keeps_the_end() {
        let mut t = Tail::default();
        for i in 0..1000 {
            t.push(format!("line {i}"));
        }
        let r = t.render();
        assert!(r.len() <= TAIL_BYTES);
        assert!(r.ends_with("line 999"));
        t.push("é".repeat(TAIL_BYTES));
        let r = t.render();
        assert!(r.len() <= TAIL_BYTES && r.ends_with('é'));
    }
}
