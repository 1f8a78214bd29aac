//! The lifecycle's words: the events of an in-place deployment in CodeDeploy's order, and
//! `file_exists_behavior`. The AppSpec, the engine, the wire protocol and the controller all
//! use these types, so a name is spelled, ordered and checked in one place.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What Install does with a file already at a destination that no previous deployment of the
/// group placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FileExistsBehavior {
    /// Fail the deployment, naming the file (CodeDeploy's default).
    #[default]
    Disallow,
    /// Replace the existing file with the bundle's.
    Overwrite,
    /// Keep the existing file and skip the bundle's.
    Retain,
}

/// An unknown `file_exists_behavior` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown file_exists_behavior `{0}`: use DISALLOW, OVERWRITE or RETAIN")]
pub struct UnknownFileExistsBehavior(pub String);

impl FileExistsBehavior {
    /// The AppSpec / codedeploy-local spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FileExistsBehavior::Disallow => "DISALLOW",
            FileExistsBehavior::Overwrite => "OVERWRITE",
            FileExistsBehavior::Retain => "RETAIN",
        }
    }
}

impl FromStr for FileExistsBehavior {
    type Err = UnknownFileExistsBehavior;

    /// Exactly `DISALLOW`, `OVERWRITE` or `RETAIN`, as CodeDeploy spells them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "DISALLOW" => Ok(FileExistsBehavior::Disallow),
            "OVERWRITE" => Ok(FileExistsBehavior::Overwrite),
            "RETAIN" => Ok(FileExistsBehavior::Retain),
            _ => Err(UnknownFileExistsBehavior(s.to_string())),
        }
    }
}

impl fmt::Display for FileExistsBehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deployment lifecycle event, in CodeDeploy's order for an in-place deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[allow(missing_docs)] // The CodeDeploy event names speak for themselves.
pub enum LifecycleEvent {
    BeforeBlockTraffic,
    AfterBlockTraffic,
    ApplicationStop,
    DownloadBundle,
    BeforeInstall,
    Install,
    AfterInstall,
    ApplicationStart,
    ValidateService,
    BeforeAllowTraffic,
    AfterAllowTraffic,
}

/// A lifecycle event name that is not one of CodeDeploy's (names are case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lifecycle event `{0}`: event names are case-sensitive, e.g. ApplicationStart")]
pub struct UnknownLifecycleEvent(pub String);

impl LifecycleEvent {
    /// Every event, in lifecycle order.
    pub const ALL: [LifecycleEvent; 11] = [
        LifecycleEvent::BeforeBlockTraffic,
        LifecycleEvent::AfterBlockTraffic,
        LifecycleEvent::ApplicationStop,
        LifecycleEvent::DownloadBundle,
        LifecycleEvent::BeforeInstall,
        LifecycleEvent::Install,
        LifecycleEvent::AfterInstall,
        LifecycleEvent::ApplicationStart,
        LifecycleEvent::ValidateService,
        LifecycleEvent::BeforeAllowTraffic,
        LifecycleEvent::AfterAllowTraffic,
    ];

    /// The CodeDeploy name, as written under `hooks` and in `LIFECYCLE_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::BeforeBlockTraffic => "BeforeBlockTraffic",
            LifecycleEvent::AfterBlockTraffic => "AfterBlockTraffic",
            LifecycleEvent::ApplicationStop => "ApplicationStop",
            LifecycleEvent::DownloadBundle => "DownloadBundle",
            LifecycleEvent::BeforeInstall => "BeforeInstall",
            LifecycleEvent::Install => "Install",
            LifecycleEvent::AfterInstall => "AfterInstall",
            LifecycleEvent::ApplicationStart => "ApplicationStart",
            LifecycleEvent::ValidateService => "ValidateService",
            LifecycleEvent::BeforeAllowTraffic => "BeforeAllowTraffic",
            LifecycleEvent::AfterAllowTraffic => "AfterAllowTraffic",
        }
    }

    /// False for DownloadBundle and Install, which the agent itself performs: an AppSpec may
    /// not attach scripts to them.
    pub fn is_hookable(self) -> bool {
        !matches!(
            self,
            LifecycleEvent::DownloadBundle | LifecycleEvent::Install
        )
    }
}

impl FromStr for LifecycleEvent {
    type Err = UnknownLifecycleEvent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LifecycleEvent::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| UnknownLifecycleEvent(s.to_string()))
    }
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Events asked for in an order the lifecycle cannot run them in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{later} cannot come after {earlier}: events run in lifecycle order ({})", LifecycleEvent::ALL.map(|e| e.as_str()).join(", "))]
pub struct EventOrderError {
    /// The event listed first.
    pub(crate) earlier: LifecycleEvent,
    /// The event listed after it, which the lifecycle runs before (or is the same event).
    pub(crate) later: LifecycleEvent,
}

impl LifecycleEvent {
    /// Position in the lifecycle, from 0.
    pub fn position(self) -> usize {
        LifecycleEvent::ALL
            .iter()
            .position(|x| *x == self)
            .expect("ALL lists every event")
    }
}

/// Checks that `events` are listed in lifecycle order, each once.
pub fn check_order(events: &[LifecycleEvent]) -> Result<(), EventOrderError> {
    for pair in events.windows(2) {
        if pair[0].position() >= pair[1].position() {
            return Err(EventOrderError {
                earlier: pair[0],
                later: pair[1],
            });
        }
    }
    Ok(())
}

/// Why a list of event names cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventListError {
    /// A name that is not one of CodeDeploy's events.
    #[error(transparent)]
    Unknown(#[from] UnknownLifecycleEvent),
    /// The events are out of lifecycle order, or one is listed twice.
    #[error(transparent)]
    Order(#[from] EventOrderError),
}

/// Parses event names (as `--events` or a command's `events` gives them) and checks their
/// order: what the controller refuses before sending and the agent refuses before running.
pub fn parse_events<S: AsRef<str>>(names: &[S]) -> Result<Vec<LifecycleEvent>, EventListError> {
    let events = names
        .iter()
        .map(|n| n.as_ref().parse::<LifecycleEvent>())
        .collect::<Result<Vec<_>, _>>()?;
    check_order(&events)?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_order() {
        for (i, e) in LifecycleEvent::ALL.iter().enumerate() {
            assert_eq!(e.as_str().parse::<LifecycleEvent>().unwrap(), *e);
            assert_eq!(e.position(), i);
        }
    }

    #[test]
    fn unknown_and_misordered_lists_are_refused_naming_the_event() {
        let e = parse_events(&["ApplicationStart", "Validate"]).unwrap_err();
        assert!(e.to_string().contains("`Validate`"), "{e}");
        let e = parse_events(&["ApplicationStart", "BeforeInstall"]).unwrap_err();
        assert_eq!(
            e,
            EventListError::Order(EventOrderError {
                earlier: LifecycleEvent::ApplicationStart,
                later: LifecycleEvent::BeforeInstall
            })
        );
        assert!(e
            .to_string()
            .starts_with("BeforeInstall cannot come after ApplicationStart"));
        assert!(parse_events(&["Install", "Install"]).is_err());
        assert_eq!(
            parse_events(&["BeforeInstall", "ValidateService"]).unwrap(),
            vec![
                LifecycleEvent::BeforeInstall,
                LifecycleEvent::ValidateService
            ]
        );
    }

    #[test]
    fn file_exists_behavior_spellings_are_codedeploys() {
        for s in ["DISALLOW", "OVERWRITE", "RETAIN"] {
            assert_eq!(s.parse::<FileExistsBehavior>().unwrap().as_str(), s);
        }
        assert!("overwrite".parse::<FileExistsBehavior>().is_err());
    }
}
