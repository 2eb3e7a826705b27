//! The compile cache: components' machine code by digest, loaded only if this host wrote it.
//!
//! Loading machine code is `unsafe`: wasmtime runs what the file says. So the directory must
//! be this user's and closed to others (created 0700; one others can write is not used), each
//! entry carries the sha256 of its code and is checked before loading, and the directory is
//! kept under a size cap, oldest-used entries going first.

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use wasmtime::component::Component;
use wasmtime::Engine;

/// Where compiled components are kept, and how much of them.
#[derive(Clone, Debug)]
pub struct CompileCache {
    pub dir: PathBuf,
    /// Total bytes of entries kept; older ones are removed past it.
    pub max_bytes: u64,
}

const DIGEST: usize = 32;

impl CompileCache {
    /// Compiles `bytes`, or loads the machine code this host compiled earlier for the same
    /// digest and the same engine settings.
    pub fn compile(&self, engine: &Engine, bytes: &[u8], sha256: &str) -> Result<Component> {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let file = self.dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
        let usable = match self.usable_dir() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "not using the compile cache");
                false
            }
        };
        if usable && file.exists() {
            match load(engine, &file) {
                Ok(c) => {
                    crate::metrics::get().compile_cache_hits.inc();
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "ignoring a compile cache entry; compiling again")
                }
            }
        }
        crate::metrics::get().compile_cache_misses.inc();
        let cwasm = engine
            .precompile_component(bytes)
            .map_err(anyhow::Error::from)?;
        if usable {
            if let Err(e) = self.store(&file, &cwasm) {
                tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "could not cache compiled component");
            }
        }
        // SAFETY: produced just now by this engine.
        unsafe { Component::deserialize(engine, &cwasm) }.map_err(anyhow::Error::from)
    }

    /// Creates the directory owner-only, or checks that the existing one is ours and closed to
    /// others.
    fn usable_dir(&self) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        owned_and_closed(&self.dir)
    }

    /// Writes `[sha256 of code][code]` owner-only and renames it into place, then trims the
    /// directory to its cap.
    fn store(&self, file: &Path, cwasm: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            file.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(&Sha256::digest(cwasm))?;
        out.write_all(cwasm)?;
        drop(out);
        std::fs::rename(&tmp, file)?;
        self.trim()
    }

    /// Removes the least recently used entries until the rest fit in `max_bytes`.
    fn trim(&self) -> Result<()> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let is_entry = entry.path().extension().is_some_and(|e| e == "cwasm");
            let meta = entry.metadata()?;
            if is_entry && meta.is_file() {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push((used, meta.len(), entry.path()));
            }
        }
        entries.sort();
        let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
            tracing::info!(file = %path.display(), "removed from the compile cache (over its cap)");
        }
        Ok(())
    }
}

fn owned_and_closed(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "{} belongs to uid {}, not to this user ({me})",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} can be written by others (mode {:o})",
            path.display(),
            meta.mode() & 0o777
        );
    }
    Ok(())
}

/// The component in `file`, if it is ours and its code matches its digest.
fn load(engine: &Engine, file: &Path) -> Result<Component> {
    owned_and_closed(file)?;
    let bytes = std::fs::read(file)?;
    if bytes.len() < DIGEST || Sha256::digest(&bytes[DIGEST..])[..] != bytes[..DIGEST] {
        bail!("its code does not match its digest");
    }
    // Marks it used, for the cap's least-recently-used order.
    let _ = std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(SystemTime::now()));
    // SAFETY: the file is this user's, in a directory only this user can write, and its code
    // matches the digest written with it by `store`, from `precompile_component` of an engine
    // with the same settings (its name carries the engine's compatibility hash).
    unsafe { Component::deserialize(engine, &bytes[DIGEST..]) }.map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A minimal component, compiled by the test's engine.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    fn cache(dir: &Path, max_bytes: u64) -> CompileCache {
        CompileCache {
            dir: dir.join("cache"),
            max_bytes,
        }
    }

    fn entries(cache: &CompileCache) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cache.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn entries_are_owner_only_checked_and_a_tampered_one_is_compiled_again() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = cache(tmp.path(), 1 << 30);
        cache.compile(&engine, EMPTY_COMPONENT, "aa").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&cache.dir), 0o700);
        let [file] = entries(&cache).try_into().unwrap();
        assert_eq!(mode(&file), 0o600);
        load(&engine, &file).unwrap();

        // One flipped byte of code: refused, then replaced by a fresh compile.
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let err = load(&engine, &file).err().unwrap().to_string();
        assert!(err.contains("digest"), "{err}");
        cache.compile(&engine, EMPTY_COMPONENT, "aa").unwrap();
        load(&engine, &file).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = cache(tmp.path(), 1 << 30);
        std::fs::create_dir_all(&cache.dir).unwrap();
        std::fs::set_permissions(&cache.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(cache.usable_dir().is_err());
        cache.compile(&engine, EMPTY_COMPONENT, "aa").unwrap();
        assert!(
            entries(&cache).is_empty(),
            "nothing written to an open directory"
        );
    }

    #[test]
    fn the_cap_removes_the_least_recently_used_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let one = {
            let probe = cache(&tmp.path().join("probe"), 1 << 30);
            probe.compile(&engine, EMPTY_COMPONENT, "x").unwrap();
            std::fs::metadata(&entries(&probe)[0]).unwrap().len()
        };
        let cache = cache(tmp.path(), 2 * one);
        for sha in ["a1", "b2", "c3"] {
            cache.compile(&engine, EMPTY_COMPONENT, sha).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let names: Vec<String> = entries(&cache)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy()[..2].to_string())
            .collect();
        assert_eq!(names, ["b2", "c3"]);
    }
}
