//! The manifest (`services.toml`): which services this host runs, and what each may do.
//!
//! Parsed with serde (`deny_unknown_fields`) and validated before anything starts. Every error
//! names the file, the line and column, and the field, so the host can refuse a bad manifest
//! with one message instead of starting half of it.

use super::units::parse_size;
use super::{AllowedOrigin, ConfigValues, Instances, Limits, ServiceSpec, Start};
use indexmap::IndexMap;
use platform_contract::MAX_NAME;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    service: IndexMap<Spanned<String>, ServiceTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTable {
    /// The component file, relative to `--components-dir`.
    component: Spanned<String>,
    /// Omitted: reachable only from other services.
    port: Option<Spanned<u16>>,
    #[serde(default)]
    calls: Vec<Spanned<String>>,
    /// The service a middleware's `wasi:http/handler@0.3` import hands requests to.
    next: Option<Spanned<String>>,
    #[serde(default)]
    produces: Vec<Spanned<String>>,
    #[serde(default)]
    subscribe: Vec<Subscribe>,
    #[serde(default)]
    limits: LimitsTable,
    #[serde(default)]
    instances: InstancesTable,
    /// Testing aid: a delay before each in-process call into the service.
    latency: Option<Spanned<String>>,
    /// Buckets `wasi:keyvalue` may open.
    #[serde(default)]
    key_value_stores: Vec<Spanned<String>>,
    /// Clients `wasi:messaging` may connect.
    #[serde(default)]
    messaging_clients: Vec<Spanned<String>>,
    /// What `wasi:config/store` answers: values, or environment variables of the host.
    #[serde(default)]
    config: BTreeMap<Spanned<String>, Spanned<ConfigEntry>>,
    /// Origins outside the host it may send `wasi:http` requests to.
    #[serde(default)]
    allowed_outbound_hosts: Vec<Spanned<String>>,
}

/// A `config` value: written in the manifest, or `{ env = "NAME" }`, taken from the host's
/// environment when the manifest is read, so that no secret sits in the file.
#[derive(Deserialize)]
#[serde(untagged)]
enum ConfigEntry {
    Value(String),
    Env(EnvReference),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvReference {
    env: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    topic: Spanned<String>,
    group: Option<String>,
    #[serde(default)]
    start: Start,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    memory: Option<Spanned<String>>,
    cpu: Option<Spanned<String>>,
    concurrency: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InstancesTable {
    reuse: Option<Spanned<u64>>,
    concurrent: Option<Spanned<u64>>,
    idle: Option<Spanned<String>>,
}

/// Bounds of the manifest's numbers: past them a value is a mistake, and some would make the
/// host fail at run time (a semaphore's permits, an instant's overflow).
pub const CONCURRENCY: std::ops::RangeInclusive<u64> = 1..=100_000;
/// A 32-bit linear memory is at most 4 GiB; one page is the least a memory has.
pub const MEMORY: std::ops::RangeInclusive<u64> = (64 << 10)..=(4 << 30);
pub const CPU: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(1)..=std::time::Duration::from_secs(3600);
pub const REUSE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
pub const CONCURRENT: std::ops::RangeInclusive<u64> = 1..=1024;
pub const IDLE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_millis(1)..=std::time::Duration::from_secs(3600);
pub const LATENCY: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::ZERO..=std::time::Duration::from_secs(60);

/// A manifest that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

/// What the manifest's services run with unless they say otherwise, and where things are.
pub struct Context<'a> {
    pub path: &'a Path,
    pub components_dir: &'a Path,
    pub defaults: &'a Limits,
    /// `--port NAME=PORT` overrides.
    pub ports: &'a BTreeMap<String, u16>,
}

/// Kafka's rule for topic names, so that a topic valid here is valid on every backend.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The dead-letter topic of `topic`: where a handler's records go after their last attempt.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Service names become host names (`<name>-service`), metric labels and state scopes.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl Context<'_> {
    fn error(&self, text: &str, span: Option<Range<usize>>, message: String) -> ManifestError {
        let at = span.map_or(self.path.display().to_string(), |s| self.at(text, s));
        ManifestError(format!("{at}: {message}"))
    }

    /// `FILE:LINE:COLUMN` of `span` in `text`.
    fn at(&self, text: &str, span: Range<usize>) -> String {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{column}", self.path.display())
    }

    /// Validates `text` as the manifest at `self.path`.
    pub fn parse(&self, text: &str) -> Result<Vec<ServiceSpec>, ManifestError> {
        let file: File = toml::from_str(text)
            .map_err(|e| self.error(text, e.span(), e.message().trim().to_string()))?;
        let err = |span: Range<usize>, message: String| self.error(text, Some(span), message);
        if file.service.is_empty() {
            return Err(self.error(text, None, "declares no [service.NAME]".into()));
        }
        if let Some(name) = self
            .ports
            .keys()
            .find(|n| !file.service.keys().any(|k| k.get_ref() == *n))
        {
            return Err(self.error(
                text,
                None,
                format!("--port names {name:?}, which is not declared"),
            ));
        }
        let declared = |name: &str| file.service.keys().any(|k| k.get_ref() == name);
        let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
        let mut specs = Vec::new();
        if let Some(bad) = file.service.keys().find(|n| !valid_name(n.get_ref())) {
            let message = format!("service name {:?}: use a-z, 0-9 and -", bad.get_ref());
            return Err(err(bad.span(), message));
        }
        for (name, entry) in &file.service {
            let (span, name) = (name.span(), name.get_ref().as_str());
            let file = self.components_dir.join(entry.component.get_ref());
            if !file.is_file() {
                return Err(err(
                    entry.component.span(),
                    format!("service.{name}.component: no file {}", file.display()),
                ));
            }
            let callees = entry.calls.iter().map(|c| ("calls", c));
            for (key, callee) in callees.chain(entry.next.iter().map(|n| ("next", n))) {
                if !declared(callee.get_ref()) {
                    return Err(err(
                        callee.span(),
                        format!(
                            "service.{name}.{key}: {:?} is not a declared service",
                            callee.get_ref()
                        ),
                    ));
                }
            }
            let topics = entry
                .produces
                .iter()
                .chain(entry.subscribe.iter().map(|s| &s.topic));
            for topic in topics {
                if !valid_topic(topic.get_ref()) {
                    return Err(err(
                        topic.span(),
                        format!(
                            "service.{name}: topic {:?} is not a valid topic name (1-249 of a-z A-Z 0-9 . _ -)",
                            topic.get_ref()
                        ),
                    ));
                }
            }
            for topic in entry.subscribe.iter().map(|s| &s.topic) {
                if !valid_topic(&dlq_topic(topic.get_ref())) {
                    return Err(err(
                        topic.span(),
                        format!(
                            "service.{name}: subscribed topic {:?} leaves no room for its dead-letter topic (at most 245 characters)",
                            topic.get_ref()
                        ),
                    ));
                }
            }
            let port = match self.ports.get(name) {
                Some(&port) => port,
                None => entry.port.as_ref().map_or(0, |p| *p.get_ref()),
            };
            if port != 0 {
                if let Some(other) = ports.insert(port, name) {
                    let span = entry.port.as_ref().map_or(span.clone(), Spanned::span);
                    return Err(err(
                        span,
                        format!("service.{name}.port: {port} is also {other}'s port"),
                    ));
                }
            }
            let bounded = |span: Range<usize>, key: &str, ok: bool, range: String| {
                if ok {
                    Ok(())
                } else {
                    Err(err(
                        span,
                        format!("service.{name}.{key}: must be in {range}"),
                    ))
                }
            };
            let mut limits = self.defaults.clone();
            if let Some(memory) = &entry.limits.memory {
                limits.memory = parse_size(memory.get_ref()).map_err(|e| {
                    err(memory.span(), format!("service.{name}.limits.memory: {e}"))
                })?;
                let ok = MEMORY.contains(&limits.memory);
                bounded(memory.span(), "limits.memory", ok, "64KiB..=4GiB".into())?;
            }
            if let Some(cpu) = &entry.limits.cpu {
                limits.cpu = humantime::parse_duration(cpu.get_ref())
                    .map_err(|e| err(cpu.span(), format!("service.{name}.limits.cpu: {e}")))?;
                bounded(
                    cpu.span(),
                    "limits.cpu",
                    CPU.contains(&limits.cpu),
                    "1ms..=1h".into(),
                )?;
            }
            if let Some(concurrency) = &entry.limits.concurrency {
                let (n, range) = (*concurrency.get_ref(), &CONCURRENCY);
                let text = format!("{}..={}", range.start(), range.end());
                bounded(
                    concurrency.span(),
                    "limits.concurrency",
                    range.contains(&n),
                    text,
                )?;
                limits.concurrency = n as usize;
            }
            let mut instances = Instances::default();
            let count = |n: &Spanned<u64>, key: &str, range: &std::ops::RangeInclusive<u64>| {
                let text = format!("{}..={}", range.start(), range.end());
                bounded(n.span(), key, range.contains(n.get_ref()), text)
                    .map(|()| *n.get_ref() as u32)
            };
            if let Some(reuse) = &entry.instances.reuse {
                instances.reuse = Some(count(reuse, "instances.reuse", &REUSE)?);
            }
            if let Some(concurrent) = &entry.instances.concurrent {
                instances.concurrent = count(concurrent, "instances.concurrent", &CONCURRENT)?;
            }
            if let Some(idle) = &entry.instances.idle {
                instances.idle = humantime::parse_duration(idle.get_ref())
                    .map_err(|e| err(idle.span(), format!("service.{name}.instances.idle: {e}")))?;
                let ok = IDLE.contains(&instances.idle);
                bounded(idle.span(), "instances.idle", ok, "1ms..=1h".into())?;
            }
            let latency = match &entry.latency {
                None => None,
                Some(l) => {
                    let latency = humantime::parse_duration(l.get_ref())
                        .map_err(|e| err(l.span(), format!("service.{name}.latency: {e}")))?;
                    bounded(
                        l.span(),
                        "latency",
                        LATENCY.contains(&latency),
                        "0s..=60s".into(),
                    )?;
                    Some(latency)
                }
            };
            let groups: Vec<&str> = entry
                .subscribe
                .iter()
                .filter_map(|s| s.group.as_deref())
                .collect();
            let starts: Vec<Start> = entry.subscribe.iter().map(|s| s.start).collect();
            if groups.windows(2).any(|g| g[0] != g[1]) || starts.windows(2).any(|s| s[0] != s[1]) {
                return Err(err(
                    span,
                    format!(
                        "service.{name}.subscribe: one consumer group and start per service, got {groups:?} {starts:?}"
                    ),
                ));
            }
            let labels = |list: &[Spanned<String>], what| {
                list.iter()
                    .map(|label| {
                        let ok = (1..=MAX_NAME).contains(&label.get_ref().len());
                        let range = format!("1..={MAX_NAME} bytes");
                        bounded(label.span(), what, ok, range).map(|()| label.get_ref().clone())
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let key_value_stores = labels(&entry.key_value_stores, "key_value_stores")?;
            let messaging_clients = labels(&entry.messaging_clients, "messaging_clients")?;
            let config = (entry.config.iter())
                .map(|(key, value)| match value.get_ref() {
                    ConfigEntry::Value(v) => Ok((key.get_ref().clone(), v.clone())),
                    ConfigEntry::Env(EnvReference { env }) => match std::env::var(env) {
                        Ok(v) => Ok((key.get_ref().clone(), v)),
                        Err(_) => Err(err(
                            value.span(),
                            format!(
                                "service.{name}.config.{}: the environment variable {env:?} is not set",
                                key.get_ref()
                            ),
                        )),
                    },
                })
                .collect::<Result<_, _>>()?;
            let allowed_outbound_hosts = (entry.allowed_outbound_hosts.iter())
                .map(|origin| {
                    origin.get_ref().parse::<AllowedOrigin>().map_err(|e| {
                        err(
                            origin.span(),
                            format!("service.{name}.allowed_outbound_hosts: {e}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            specs.push(ServiceSpec {
                name: name.into(),
                at: self.at(text, entry.component.span()),
                port,
                serves_http: entry.port.is_some() || self.ports.contains_key(name),
                file,
                // Its next hop is a service it may call.
                calls: (entry.calls.iter().chain(&entry.next))
                    .map(|c| c.get_ref().clone())
                    .collect(),
                next: entry.next.as_ref().map(|n| n.get_ref().clone()),
                subscribes: entry
                    .subscribe
                    .iter()
                    .map(|s| s.topic.get_ref().clone())
                    .collect(),
                group: groups
                    .first()
                    .map_or_else(|| format!("{name}-service"), |g| g.to_string()),
                start: starts.first().copied().unwrap_or_default(),
                produces: entry.produces.iter().map(|p| p.get_ref().clone()).collect(),
                latency,
                limits,
                instances,
                key_value_stores,
                messaging_clients,
                config: ConfigValues(Arc::new(config)),
                allowed_outbound_hosts,
            });
        }
        Ok(specs)
    }
}

/// `NAME=PORT` pairs of `--port` (and `PORTS`, comma-separated).
pub fn parse_port(rule: &str) -> Result<(String, u16), String> {
    let (name, port) = rule
        .split_once('=')
        .ok_or_else(|| format!("{rule:?} is not NAME=PORT"))?;
    let port = port
        .trim()
        .parse()
        .map_err(|_| format!("{rule:?}: {port:?} is not a port number"))?;
    Ok((name.trim().to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SEED: &str = r#"
[service.gateway]
component = "gateway.wasm"
port = 3000
calls = ["user"]

[service.user]
component = "user.wasm"
port = 3001
produces = ["user-created"]

[service.order]
component = "order.wasm"
subscribe = [{ topic = "user-created", group = "order-service" }]
limits = { memory = "32MiB", cpu = "1s", concurrency = 4 }
instances = { reuse = 50, concurrent = 4, idle = "250ms" }
"#;

    fn context(dir: &Path, ports: &BTreeMap<String, u16>, f: impl FnOnce(&Context<'_>)) {
        for c in ["gateway", "user", "order"] {
            std::fs::write(dir.join(format!("{c}.wasm")), b"").unwrap();
        }
        let defaults = Limits {
            memory: 64 << 20,
            cpu: Duration::from_secs(5),
            concurrency: 64,
        };
        f(&Context {
            path: Path::new("services.toml"),
            components_dir: dir,
            defaults: &defaults,
            ports,
        });
    }

    #[test]
    fn the_seed_shape_parses_in_order_with_defaults_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let ports = BTreeMap::from([("gateway".to_string(), 0)]);
        context(dir.path(), &ports, |c| {
            let specs = c.parse(SEED).unwrap();
            let names: Vec<&str> = specs.iter().map(|s| &*s.name).collect();
            assert_eq!(names, ["gateway", "user", "order"]);
            assert_eq!((specs[0].port, specs[1].port, specs[2].port), (0, 3001, 0));
            assert!(specs[0].serves_http && !specs[2].serves_http);
            assert_eq!(specs[0].calls, ["user"]);
            let next = SEED.replacen(
                "calls = [\"user\"]",
                "calls = [\"user\"]\nnext = \"order\"",
                1,
            );
            let gateway = c.parse(&next).unwrap().remove(0);
            assert_eq!(
                (gateway.calls, gateway.next),
                (vec!["user".into(), "order".into()], Some("order".into()))
            );
            assert_eq!(specs[1].produces, ["user-created"]);
            assert_eq!(
                (specs[2].subscribes.clone(), specs[2].group.as_str()),
                (vec!["user-created".to_string()], "order-service")
            );
            assert_eq!(
                specs[2].limits,
                Limits {
                    memory: 32 << 20,
                    cpu: Duration::from_secs(1),
                    concurrency: 4
                }
            );
            assert_eq!(specs[1].limits.memory, 64 << 20);
            assert_eq!(
                specs[2].instances,
                Instances {
                    reuse: Some(50),
                    concurrent: 4,
                    idle: Duration::from_millis(250)
                }
            );
            assert_eq!(specs[1].instances, Instances::default());
            assert_eq!(specs[1].group, "user-service");
            assert_eq!(specs[2].start, Start::Earliest);
            let latest = SEED.replace(
                "group = \"order-service\" }",
                "group = \"order-service\", start = \"latest\" }",
            );
            assert_eq!(c.parse(&latest).unwrap()[2].start, Start::Latest);
        });
    }

    #[test]
    fn every_mistake_is_refused_with_file_line_column_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let none = BTreeMap::new();
        context(dir.path(), &none, |c| {
            let refused = |text: &str| c.parse(text).unwrap_err().0;
            let with = |from: &str, to: &str| refused(&SEED.replacen(from, to, 1));
            let e = with("port = 3001", "port = 3001\ncolour = \"red\"");
            assert!(
                e.starts_with("services.toml:10:1: ") && e.contains("colour"),
                "{e}"
            );
            let e = with(
                "calls = [\"user\"]",
                "calls = [\"user\"]\nnext = \"billing\"",
            );
            assert!(
                e.starts_with("services.toml:6:8: ")
                    && e.contains("service.gateway.next")
                    && e.contains("billing"),
                "{e}"
            );
            let e = with("calls = [\"user\"]", "calls = [\"user\", \"billing\"]");
            assert!(
                e.starts_with("services.toml:5:18: ")
                    && e.contains("service.gateway.calls")
                    && e.contains("billing"),
                "{e}"
            );
            let e = with("port = 3001", "port = 3000");
            assert!(
                e.starts_with("services.toml:9:8: ") && e.contains("also gateway's port"),
                "{e}"
            );
            let e = with(
                "produces = [\"user-created\"]",
                "produces = [\"user created\"]",
            );
            assert!(
                e.starts_with("services.toml:10:13: ") && e.contains("not a valid topic"),
                "{e}"
            );
            let long = "t".repeat(246);
            let e = with("topic = \"user-created\"", &format!("topic = \"{long}\""));
            assert!(
                e.contains("leaves no room for its dead-letter topic"),
                "{e}"
            );
            let e = with("component = \"order.wasm\"", "component = \"nope.wasm\"");
            assert!(
                e.starts_with("services.toml:13:13: ") && e.contains("no file"),
                "{e}"
            );
            let e = with(
                "group = \"order-service\" }",
                "group = \"order-service\", start = \"now\" }",
            );
            assert!(
                e.starts_with("services.toml:14:") && e.contains("now"),
                "{e}"
            );
            let e = with("cpu = \"1s\"", "cpu = \"soon\"");
            assert!(e.contains("service.order.limits.cpu"), "{e}");
            // Every number is bounded, with where it is.
            for (from, to, key) in [
                (
                    "concurrency = 4",
                    "concurrency = 1000000000000000",
                    "limits.concurrency",
                ),
                ("concurrency = 4", "concurrency = 0", "limits.concurrency"),
                ("cpu = \"1s\"", "cpu = \"100000000years\"", "limits.cpu"),
                ("cpu = \"1s\"", "cpu = \"0s\"", "limits.cpu"),
                ("memory = \"32MiB\"", "memory = \"5GiB\"", "limits.memory"),
                ("memory = \"32MiB\"", "memory = \"1KiB\"", "limits.memory"),
                ("reuse = 50", "reuse = 0", "instances.reuse"),
                ("concurrent = 4", "concurrent = 0", "instances.concurrent"),
                (
                    "concurrent = 4",
                    "concurrent = 5000",
                    "instances.concurrent",
                ),
                ("idle = \"250ms\"", "idle = \"2h\"", "instances.idle"),
                (
                    "port = 3001",
                    "port = 3001\nkey_value_stores = [\"\"]",
                    "key_value_stores",
                ),
                (
                    "port = 3001",
                    "port = 3001\nmessaging_clients = [\"default\", \"\"]",
                    "messaging_clients",
                ),
            ] {
                let e = with(from, to);
                assert!(
                    e.starts_with("services.toml:") && e.contains(key) && e.contains("must be in"),
                    "{to}: {e}"
                );
            }
            let e = with(
                "component = \"order.wasm\"",
                "component = \"order.wasm\"\nlatency = \"2h\"",
            );
            assert!(
                e.contains("service.order.latency") && e.contains("must be in"),
                "{e}"
            );
            let e = with("[service.user]", "[service.User]");
            assert!(
                e.starts_with("services.toml:7:10: ") && e.contains("service name"),
                "{e}"
            );
            let e = refused("[service.a]\ncomponent = ");
            assert!(e.starts_with("services.toml:2:"), "{e}");
            assert!(refused("").contains("no [service.NAME]"));
        });
        let ports = BTreeMap::from([("billing".to_string(), 1)]);
        context(dir.path(), &ports, |c| {
            assert!(c
                .parse(SEED)
                .unwrap_err()
                .0
                .contains("--port names \"billing\""));
        });
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("user=0"), Ok(("user".into(), 0)));
        assert!(parse_port("user").is_err());
        assert!(parse_port("user=http").is_err());
    }
}
