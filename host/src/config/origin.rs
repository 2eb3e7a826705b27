//! `allowed_outbound_hosts`: the origins outside the host a service may send `wasi:http`
//! requests to.

/// One origin pattern of `allowed_outbound_hosts`: `scheme://host[:port]`, where the scheme is
/// `http` or `https`, the host a name, an address, `*` or `*.suffix`, and the port a number or
/// `*` (omitted: the scheme's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin {
    https: bool,
    host: String,
    port: Option<u16>,
}

impl std::str::FromStr for AllowedOrigin {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowedOrigin, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} is not scheme://host[:port]"))?;
        let https = match scheme {
            "http" => false,
            "https" => true,
            _ => return Err(format!("{text:?}: the scheme must be http or https")),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, "*")) => (host, None),
            Some((host, port)) => {
                let port = port
                    .parse()
                    .map_err(|_| format!("{text:?}: port {port:?}"))?;
                (host, Some(port))
            }
            None => (rest, Some(if https { 443 } else { 80 })),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || "-.*".contains(c);
        if host.is_empty() || !host.chars().all(valid) || host[1..].contains('*') {
            return Err(format!(
                "{text:?}: the host must be a name, an address, * or *.suffix"
            ));
        }
        Ok(AllowedOrigin {
            https,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl AllowedOrigin {
    /// The host as written: a name, an address, `*` or `*.suffix`.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn allows(&self, https: bool, host: &str, port: u16) -> bool {
        let host_matches = match self.host.strip_prefix('*') {
            Some("") => true,
            Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
            None => self.host == host,
        };
        self.https == https && host_matches && self.port.is_none_or(|p| p == port)
    }
}

/// The first of `allowed` that `uri` (scheme, host and port) matches.
pub fn origin_allowed<'a>(
    allowed: &'a [AllowedOrigin],
    uri: &http::Uri,
) -> Option<&'a AllowedOrigin> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    allowed
        .iter()
        .find(|origin| origin.allows(https, &host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Vec<AllowedOrigin> {
        list.iter().map(|o| o.parse().unwrap()).collect()
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let list = origins(&[
            "https://api.example.com",
            "http://127.0.0.1:*",
            "https://*.acme.io:8443",
        ]);
        let ok = |uri: &str| origin_allowed(&list, &uri.parse().unwrap()).is_some();
        assert!(ok("https://api.example.com/v1"));
        assert!(ok("https://API.example.com:443/"));
        assert!(!ok("http://api.example.com/"));
        assert!(!ok("https://api.example.com:8443/"));
        assert!(ok("http://127.0.0.1:4711/x"));
        assert!(!ok("https://127.0.0.1:4711/x"));
        assert!(ok("https://eu.acme.io:8443/"));
        assert!(!ok("https://acme.io:8443/"));
        assert!(!ok("https://evilacme.io:8443/"));
        for bad in [
            "api.example.com",
            "ftp://x",
            "https://",
            "https://a*b.com",
            "https://x:port",
        ] {
            assert!(bad.parse::<AllowedOrigin>().is_err(), "{bad}");
        }
    }
}
