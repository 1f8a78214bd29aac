//! The one rule for ids that end up in file names, object keys and log fields: deployment
//! ids, deployment group ids and host ids. Config, the wire protocol, the spool and the
//! dedupe store all check with [`check_id`], so an id one accepts the others accept too.

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// An id that is not safe as a single path component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{}` is not a valid id: use 1-128 characters of A-Z a-z 0-9 . _ - not starting with a dot", shown(.0))]
pub struct InvalidId(pub String);

/// The id as shown in an error: at most 64 characters, control characters escaped.
pub(crate) fn shown(id: &str) -> String {
    let mut s: String = id.chars().take(64).flat_map(char::escape_debug).collect();
    if id.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Checks `id` against the id rule: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (so never `.`, `..` or a hidden file name).
pub fn check_id(id: &str) -> Result<(), InvalidId> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(InvalidId(id.to_string()))
    }
}

/// True when `id` follows the id rule ([`check_id`]).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A fresh deployment id in CodeDeploy's shape: `d-` and nine upper-case letters or digits.
pub fn new_deployment_id() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let tail: String = (0..9)
        .map(|_| CHARS[rand::random_range(0..CHARS.len())] as char)
        .collect();
    format!("d-{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "a\nb"] {
            assert!(check_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_id(&"a".repeat(129)).is_err());
        for good in [
            "d-ABC123XYZ",
            "web_fleet-1",
            "i-0abc",
            "a.b",
            &"a".repeat(128),
        ] {
            assert!(check_id(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn new_ids_follow_the_rule_and_codedeploys_shape() {
        let id = new_deployment_id();
        assert!(is_valid_id(&id));
        assert!(id.starts_with("d-") && id.len() == 11, "{id}");
    }

    #[test]
    fn an_invalid_id_is_shown_bounded_and_escaped() {
        let e = check_id(&format!("{}\n", "x".repeat(1000)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
        assert!(!e.contains('\n'));
    }
}
