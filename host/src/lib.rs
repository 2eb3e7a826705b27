//! The host: runs microservices as WebAssembly components in one process.
//!
//! Layers, each importing only from the ones below it:
//! `app`, `telemetry` → `ingress`, `ops` → `runtime` → `capabilities`, `messaging` → `storage` →
//! `types`, `config`, `metrics`.

pub mod app;
pub mod capabilities;
pub mod config;
pub mod ingress;
pub mod messaging;
pub mod metrics;
pub mod ops;
pub mod runtime;
pub mod storage;
pub mod telemetry;
pub mod types;

#[cfg(test)]
#[path = "../tests/support/broker.rs"]
mod broker;
#[cfg(test)]
#[path = "../tests/support/postgres.rs"]
mod postgres_server;

#[cfg(test)]
mod layers {
    use std::path::Path;

    /// The layers of the doc comment above, lowest first.
    const LAYERS: [&[&str]; 6] = [
        &["types", "config", "metrics"],
        &["storage"],
        &["capabilities", "messaging"],
        &["runtime"],
        &["ingress", "ops"],
        &["app", "telemetry"],
    ];

    fn layer(module: &str) -> usize {
        LAYERS
            .iter()
            .position(|l| l.contains(&module))
            .unwrap_or_else(|| panic!("module {module} is in no layer"))
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_module_imports_only_from_its_own_module_or_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_str().unwrap();
            let top = top.trim_end_matches(".rs");
            if matches!(top, "lib" | "main") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            // Tests may use anything.
            let code = text.split("#[cfg(test)]").next().unwrap();
            for (at, _) in code.match_indices("crate::") {
                let target: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // Test support (`#[cfg(test)]` in this file) is for tests only, at any layer.
                let support = matches!(target.as_str(), "broker" | "postgres_server");
                if target != top && !support && layer(&target) >= layer(top) {
                    wrong.push(format!("{} imports crate::{target}", rel.display()));
                }
            }
        }
        assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
    }
}
