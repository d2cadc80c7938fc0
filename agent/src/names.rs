//! The one naming rule for topics, subscriptions and consumer groups.
//!
//! A name is 1 to 200 characters of ASCII letters, digits, `.`, `_` and `-`,
//! starting with a letter or digit. The rule keeps names safe as directory
//! names, URL path segments and metric label values.

use crate::error::ApiError;

/// Longest allowed name.
pub const MAX_NAME_LEN: usize = 200;

/// Checks `name` against the naming rule; `what` names the thing in the error.
pub fn validate(what: &str, name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::bad_request(
            "invalid_name",
            format!(
                "invalid {what} name {name:?}: {why} (names are 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
            ),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("too long");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("contains a character outside A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["orders", "a", "orders.v2", "A_b-9", &"x".repeat(200)] {
            assert!(validate("topic", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "ü",
            "..",
            &"x".repeat(201),
        ] {
            assert!(validate("topic", bad).is_err(), "{bad}");
        }
    }
}
