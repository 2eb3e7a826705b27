//! Parsers of the flags' small languages: sizes, allowlists, `service=value` rules, limits.

use super::{Limits, SERVICES};
use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;

pub(super) fn parse_allow(spec: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for rule in spec.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (caller, callees) = rule
            .split_once('=')
            .with_context(|| format!("OUTBOUND_ALLOW rule {rule:?} is not caller=callee,..."))?;
        let callees: Vec<String> = callees
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        for name in std::iter::once(caller.trim()).chain(callees.iter().map(String::as_str)) {
            if !SERVICES.contains(&name) {
                bail!("OUTBOUND_ALLOW names unknown service {name:?} (known: {SERVICES:?})");
            }
        }
        out.insert(caller.trim().to_string(), callees);
    }
    Ok(out)
}

/// `memory:32MiB/cpu:1s/concurrency:16`, any subset, over `defaults`.
pub(super) fn parse_limits(defaults: &Limits, spec: &str) -> Result<Limits> {
    let mut limits = defaults.clone();
    for part in spec.split('/').map(str::trim).filter(|p| !p.is_empty()) {
        let (what, value) = part
            .split_once(':')
            .with_context(|| format!("SERVICE_LIMITS item {part:?} is not kind:value"))?;
        match what {
            "memory" => limits.memory = parse_size(value).map_err(anyhow::Error::msg)?,
            "cpu" => limits.cpu = humantime::parse_duration(value)?,
            "concurrency" => limits.concurrency = value.parse()?,
            _ => bail!("SERVICE_LIMITS: unknown limit {what:?} (memory, cpu, concurrency)"),
        }
    }
    Ok(limits)
}

/// `64MiB`, `512KiB`, `1GiB` or plain bytes.
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64MiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `service=value,...` with known service names.
pub(super) fn parse_rules(what: &str, spec: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (name, value) = rule
            .split_once('=')
            .with_context(|| format!("{what} rule {rule:?} is not service=value"))?;
        if !SERVICES.contains(&name) || value.is_empty() {
            bail!("{what} rule {rule:?}: unknown service or empty value");
        }
        out.insert(name.to_string(), value.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_rejects_unknown_services() {
        assert!(parse_allow("gateway=user,billing").is_err());
        assert!(parse_allow("gateway").is_err());
        assert_eq!(parse_allow("").unwrap().len(), 0);
    }

    #[test]
    fn sizes_have_units() {
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }
}
