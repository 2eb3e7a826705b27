//! `docker-compose.yml` as Compose reads it: every service's variables are interpolated before
//! profiles pick services, so one required variable in a profile-gated service stops
//! `docker compose up -d kafka` too.

/// The `${...}` expressions of `text`, without the braces (`$$` is a literal dollar).
fn interpolations(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            rest = after;
        } else if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').expect("an unclosed ${");
            found.push(&inner[..end]);
            rest = &inner[end + 1..];
        }
    }
    found
}

/// Compose's error for `expr` interpolated with no variable set, if any.
fn unset_error(expr: &str) -> Option<String> {
    let name_end = expr
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(expr.len());
    let (name, modifier) = expr.split_at(name_end);
    (modifier.starts_with(":?") || modifier.starts_with('?'))
        .then(|| format!("required variable {name} is missing a value"))
}

#[test]
fn every_service_of_the_compose_file_interpolates_with_no_variables_set() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker-compose.yml"
    ))
    .unwrap();
    let errors: Vec<String> = interpolations(&text)
        .into_iter()
        .filter_map(unset_error)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    // What the check catches.
    let required = "x: ${ADMIN_TOKEN:?set it}\ny: $${LITERAL:?no}\nz: ${A-b}";
    let errors: Vec<String> = interpolations(required)
        .into_iter()
        .filter_map(unset_error)
        .collect();
    assert_eq!(errors, ["required variable ADMIN_TOKEN is missing a value"]);
}
