//! What user-service takes for an email address.

pub const MAX_EMAIL_CHARS: usize = 254;

/// A deliberately simple email check: at most [`MAX_EMAIL_CHARS`] characters, no whitespace or
/// control characters, exactly one `@`, a non-empty local part, and a domain of at least two
/// non-empty dot-separated labels. It is not RFC 5322; it rejects what is obviously not an
/// address.
pub fn validate_email(email: &str) -> Result<(), String> {
    if email.is_empty() {
        return Err("`email` must not be empty".into());
    }
    if email.chars().count() > MAX_EMAIL_CHARS {
        return Err(format!(
            "`email` must be at most {MAX_EMAIL_CHARS} characters"
        ));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("`email` must not contain whitespace".into());
    }
    let invalid = || format!("`email` is not a valid address: {email:?}");
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    if domain.contains('@') || local.is_empty() {
        return Err(invalid());
    }
    if !domain.contains('.') || domain.split('.').any(str::is_empty) {
        return Err(invalid());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_emails() {
        for ok in [
            "a@b.co",
            "Alice.Smith+tag@Example.COM",
            "x@sub.domain.example",
            "ünï@exämple.de",
        ] {
            assert_eq!(validate_email(ok), Ok(()), "{ok:?}");
        }
        let longest = format!("{}@example.com", "a".repeat(MAX_EMAIL_CHARS - 12));
        assert_eq!(longest.chars().count(), MAX_EMAIL_CHARS);
        assert_eq!(validate_email(&longest), Ok(()));
    }

    #[test]
    fn invalid_emails() {
        let too_long = format!("{}@example.com", "a".repeat(MAX_EMAIL_CHARS - 11));
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a@b@c.com",
            "a b@c.com",
            " a@b.com",
            "a@b.com\n",
            "a\t@b.com",
            "a@.com",
            "a@b.",
            "a@b..com",
            too_long.as_str(),
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
