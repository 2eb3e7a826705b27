//! Parsing client input: paths, ids, JSON bodies and the fields the services validate.
//!
//! Every failure comes back as a ready-made 400 [`Response`] so handlers can use `?`; no
//! client input reaches an `unwrap`.

use serde_json::{Map, Number, Value};

use crate::Response;

/// Handlers return `Err` with the response to send when they stop early.
pub type Outcome = Result<Response, Response>;

/// Path split into segments, with one trailing slash ignored so that `/users/` routes like
/// `/users`. `/` gives no segments. Empty inner segments (`/users//1`) are kept so that they
/// match no route instead of silently aliasing another one.
pub fn segments(path: &str) -> Vec<&str> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    }
}

/// A positive integer id from a path segment. Only ASCII digits are accepted: `+1`, `-1`,
/// ` 1`, `1.0`, `0` and values beyond `u64` are all rejected.
pub fn parse_id(segment: &str) -> Result<u64, String> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("id must be a positive integer, got {segment:?}"));
    }
    match segment.parse::<u64>() {
        Ok(0) => Err("id must be a positive integer, got 0".into()),
        Ok(id) => Ok(id),
        Err(_) => Err(format!("id {segment} is too large")),
    }
}

/// [`parse_id`] with the error already a 400.
pub fn path_id(segment: &str) -> Result<u64, Response> {
    parse_id(segment).map_err(Response::bad_request)
}

/// The request body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::bad_request(
            "request body must be a JSON object, got an empty body",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Response::bad_request(format!(
            "request body must be a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => Err(Response::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// A field that must be present and a string (which may be empty; callers decide).
pub fn string_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, Response> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(missing(name)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(wrong_type(name, "a string", other)),
    }
}

/// A field that must be a JSON integer ≥ 1 (`1.0`, `"1"`, `0`, `-1` are all rejected).
pub fn positive_int_field(obj: &Map<String, Value>, name: &str) -> Result<u64, Response> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(missing(name)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v > 0 => Ok(v),
            _ => Err(Response::bad_request(format!(
                "`{name}` must be a positive integer, got {n}"
            ))),
        },
        Some(other) => Err(wrong_type(name, "a positive integer", other)),
    }
}

/// A field that must be a finite JSON number ≥ 0. The `Number` is returned as sent so that
/// integers stay integers in the stored record.
pub fn non_negative_number_field(obj: &Map<String, Value>, name: &str) -> Result<Number, Response> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(missing(name)),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() && f >= 0.0 => Ok(n.clone()),
            _ => Err(Response::bad_request(format!(
                "`{name}` must be a number >= 0, got {n}"
            ))),
        },
        Some(other) => Err(wrong_type(name, "a number", other)),
    }
}

pub const MAX_NAME_CHARS: usize = 200;

/// A display name: trimmed, non-empty, at most [`MAX_NAME_CHARS`] characters. Returns the
/// trimmed name, which is what gets stored.
pub fn validate_name(field: &str, name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{field}` must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "`{field}` must be at most {MAX_NAME_CHARS} characters"
        ));
    }
    Ok(name.to_string())
}

fn missing(name: &str) -> Response {
    Response::bad_request(format!("missing field `{name}`"))
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> Response {
    Response::bad_request(format!(
        "`{name}` must be {expected}, got {}",
        type_name(got)
    ))
}

fn type_name(v: &Value) -> &'static str {
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
    use super::*;

    #[test]
    fn segments_ignore_one_trailing_slash() {
        assert_eq!(segments("/"), Vec::<&str>::new());
        assert_eq!(segments(""), Vec::<&str>::new());
        assert_eq!(segments("/users"), ["users"]);
        assert_eq!(segments("/users/"), ["users"]);
        assert_eq!(segments("/users/7/"), ["users", "7"]);
        assert_eq!(segments("/users//"), ["users", ""]);
    }

    #[test]
    fn ids_must_be_positive_integers() {
        assert_eq!(parse_id("1"), Ok(1));
        assert_eq!(parse_id("0042"), Ok(42));
        assert_eq!(parse_id("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "0",
            "000",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "abc",
            "１",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            assert!(parse_id(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(validate_name("name", "  Ada  ").as_deref(), Ok("Ada"));
        assert!(validate_name("name", "").is_err());
        assert!(validate_name("name", " \t ").is_err());
        assert!(validate_name("name", &"é".repeat(MAX_NAME_CHARS)).is_ok());
        assert!(validate_name("name", &"é".repeat(MAX_NAME_CHARS + 1)).is_err());
    }

    #[test]
    fn json_object_rejects_non_objects() {
        assert!(json_object(br#"{"a":1}"#).is_ok());
        for bad in [
            &b""[..],
            b"  ",
            b"[]",
            b"null",
            b"\"x\"",
            b"{",
            b"{\"a\":}",
            b"\xff",
        ] {
            let r = json_object(bad).unwrap_err();
            assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn typed_fields() {
        let obj = json_object(
            br#"{"s":"x","n":3,"f":1.5,"z":0,"neg":-2,"fl":1.0,"str":"4","nul":null,"big":1e300}"#,
        )
        .unwrap();
        assert_eq!(string_field(&obj, "s"), Ok("x"));
        assert_eq!(string_field(&obj, "n").unwrap_err().status, 400);
        assert_eq!(string_field(&obj, "nul").unwrap_err().status, 400);
        assert_eq!(string_field(&obj, "absent").unwrap_err().status, 400);

        assert_eq!(positive_int_field(&obj, "n"), Ok(3));
        for bad in ["z", "neg", "fl", "f", "str", "nul", "absent", "big"] {
            assert_eq!(
                positive_int_field(&obj, bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }

        assert_eq!(
            non_negative_number_field(&obj, "f").unwrap().as_f64(),
            Some(1.5)
        );
        assert_eq!(
            non_negative_number_field(&obj, "z").unwrap().as_u64(),
            Some(0)
        );
        assert!(non_negative_number_field(&obj, "big").is_ok());
        for bad in ["neg", "str", "nul", "absent"] {
            assert_eq!(
                non_negative_number_field(&obj, bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }
}
