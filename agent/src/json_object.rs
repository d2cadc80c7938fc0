//! A serde helper for optional fields that are JSON objects. Derived
//! `Deserialize` for a struct also reads a JSON array (the fields in order),
//! a form the API does not offer; these fields take an object or `null`.

use serde::de::{DeserializeOwned, Deserializer, Error};
use serde::Deserialize;
use serde_json::Value;

/// Reads an optional object field: an object, `null` (none), nothing else.
pub fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(v @ Value::Object(_)) => T::deserialize(v).map(Some).map_err(D::Error::custom),
        Some(other) => Err(D::Error::custom(format!(
            "invalid type: {}, expected a JSON object",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Inner {
        a: u32,
    }

    #[derive(serde::Deserialize, Debug)]
    struct Outer {
        #[serde(default, deserialize_with = "super::optional")]
        inner: Option<Inner>,
    }

    fn parse(s: &str) -> Result<Outer, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn objects_and_null_only() {
        assert_eq!(
            parse(r#"{"inner": {"a": 1}}"#).ok().and_then(|o| o.inner),
            Some(Inner { a: 1 })
        );
        assert!(parse(r#"{"inner": null}"#).is_ok_and(|o| o.inner.is_none()));
        assert!(parse("{}").is_ok_and(|o| o.inner.is_none()));
        assert!(parse(r#"{"inner": [1]}"#).is_err());
        assert!(parse(r#"{"inner": "x"}"#).is_err());
    }
}
