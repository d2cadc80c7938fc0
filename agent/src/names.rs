//! The one naming rule for topics, subscriptions and consumer groups, and
//! the namespaces topics and consumer groups belong to.
//!
//! A name is 1 to 200 characters of ASCII letters, digits, `.`, `_` and `-`,
//! starting with a letter or digit. The rule keeps names safe as directory
//! names, URL path segments and metric label values.
//!
//! Topics and consumer groups belong to the Kubernetes namespace of the app
//! that names them. Their *full name* is `<namespace>:<name>` (`shop:orders`),
//! except in the namespace `default`, where it is the plain name: one
//! machine's mesh (`--dev`) has no namespaces, and its names, files and wire
//! frames stay what they were. An app names its own namespace's topics by the
//! plain name and another namespace's by the full name; the full name is what
//! the agent stores, sends and shows.

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

/// The namespace whose full names are plain names.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Separates a namespace from a name in a full name.
pub const NAMESPACE_SEPARATOR: char = ':';
/// Longest namespace (a Kubernetes namespace is a DNS label).
pub const MAX_NAMESPACE_LEN: usize = 63;

/// Checks a namespace: a DNS label (1-63 of a-z 0-9 -, starting and ending
/// with a letter or digit), as Kubernetes names namespaces.
pub fn validate_namespace(ns: &str) -> Result<(), ApiError> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_name",
            format!(
                "invalid namespace {ns:?}: a namespace is 1-{MAX_NAMESPACE_LEN} characters of a-z 0-9 -, starting and ending with a letter or digit"
            ),
        ))
    }
}

/// The full name of `name` in namespace `ns`.
fn join(ns: &str, name: &str) -> String {
    if ns == DEFAULT_NAMESPACE {
        name.to_string()
    } else {
        format!("{ns}{NAMESPACE_SEPARATOR}{name}")
    }
}

/// The full name of what an app in namespace `own` calls `raw`: a plain
/// name is in `own`, `<namespace>:<name>` in that namespace.
pub fn qualify(what: &str, own: &str, raw: &str) -> Result<String, ApiError> {
    match raw.split_once(NAMESPACE_SEPARATOR) {
        Some((ns, name)) => {
            validate_namespace(ns)?;
            validate(what, name)?;
            Ok(join(ns, name))
        }
        None => {
            validate(what, raw)?;
            Ok(join(own, raw))
        }
    }
}

/// Checks a full name (from disk or a peer): a name, or `<namespace>:<name>`
/// with a namespace other than `default`.
pub fn validate_full(what: &str, full: &str) -> Result<(), ApiError> {
    match full.split_once(NAMESPACE_SEPARATOR) {
        Some((ns, name)) => {
            validate_namespace(ns)?;
            if ns == DEFAULT_NAMESPACE {
                return Err(ApiError::bad_request(
                    "invalid_name",
                    format!("invalid {what} name {full:?}: the full name of a name in namespace default is the plain name"),
                ));
            }
            validate(what, name)
        }
        None => validate(what, full),
    }
}

/// The namespace a full name belongs to.
pub fn namespace_of(full: &str) -> &str {
    full.split_once(NAMESPACE_SEPARATOR)
        .map_or(DEFAULT_NAMESPACE, |(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::{namespace_of, qualify, validate, validate_full, validate_namespace};

    #[test]
    fn a_plain_name_is_in_the_apps_namespace_and_a_full_name_in_its_own() {
        assert_eq!(qualify("topic", "shop", "orders").unwrap(), "shop:orders");
        assert_eq!(qualify("topic", "default", "orders").unwrap(), "orders");
        assert_eq!(
            qualify("topic", "shop", "billing:invoices").unwrap(),
            "billing:invoices"
        );
        assert_eq!(
            qualify("topic", "shop", "default:orders").unwrap(),
            "orders"
        );
        assert_eq!(
            qualify("topic", "default", "shop:orders").unwrap(),
            "shop:orders"
        );
        for bad in [
            "",
            ":orders",
            "shop:",
            "Shop:orders",
            "a:b:c",
            "-x:orders",
            "shop:.x",
            "x-:a",
        ] {
            assert!(qualify("topic", "shop", bad).is_err(), "{bad}");
        }
        assert_eq!(namespace_of("shop:orders"), "shop");
        assert_eq!(namespace_of("orders"), "default");
    }

    #[test]
    fn a_full_name_has_one_spelling() {
        for ok in ["orders", "shop:orders", "a-1:x.y"] {
            assert!(validate_full("topic", ok).is_ok(), "{ok}");
        }
        for bad in ["default:orders", "shop:", ":x", "shop:a:b", "SHOP:x"] {
            assert!(validate_full("topic", bad).is_err(), "{bad}");
        }
        assert!(validate_namespace(&"a".repeat(63)).is_ok());
        assert!(validate_namespace(&"a".repeat(64)).is_err());
    }

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
