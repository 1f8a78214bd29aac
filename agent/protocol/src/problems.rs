//! "Every problem at once": the list a two-step reader (raw, then checked) collects while it
//! checks a document, so that one run reports everything wrong with an agent configuration,
//! a deployment group or a controller configuration, each problem under its key
//! (`hooks.tasks_max`, `tag_filters[1].type`), instead of the first only.

use std::fmt;

/// One thing wrong with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: the key's path, e.g. `daemon.concurrency`; empty for the document as a whole.
    pub key: String,
    /// What is wrong, and what to write instead.
    pub message: String,
}

/// The problems found so far, in the order of the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem under `key`.
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records each of `keys` (found in `section`, `""` for the top level) as unknown, with
    /// `hint` saying where the known ones are listed.
    pub fn unknown<'a>(
        &mut self,
        section: &str,
        keys: impl IntoIterator<Item = &'a String>,
        hint: &str,
    ) {
        for k in keys {
            let key = if section.is_empty() {
                k.clone()
            } else {
                format!("{section}.{k}")
            };
            self.push(key, format!("unknown key ({hint})"));
        }
    }

    /// Whether a problem was already reported under `prefix` (so a consequence of it is not
    /// reported again).
    pub fn any_under(&self, prefix: &str) -> bool {
        self.0.iter().any(|p| p.key.starts_with(prefix))
    }

    /// How many so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when none, else the list.
    pub fn into_result(self) -> Result<(), Vec<Problem>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// A list of problems for a message: one `  - key: message` line each.
pub struct ProblemList<'a>(pub &'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "  - {}", p.message)?;
            } else {
                write!(f, "  - {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_listed_under_their_keys() {
        let mut p = Problems::default();
        p.push("", "the file is empty");
        p.unknown("hooks", &["colour".to_string()], "see the docs");
        assert!(p.any_under("hooks."));
        assert!(!p.any_under("daemon"));
        let list = p.clone().into_result().unwrap_err();
        assert_eq!(
            ProblemList(&list).to_string(),
            "  - the file is empty\n  - hooks.colour: unknown key (see the docs)"
        );
        assert_eq!(Problems::default().into_result(), Ok(()));
    }
}
