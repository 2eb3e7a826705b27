//! The manifest as applied, and moving a service's version back or forward.

use super::component::Loaded;
use super::{RejectedFile, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// The manifest as applied, for the admin API.
#[derive(Clone)]
pub struct ManifestStatus {
    pub path: PathBuf,
    /// sha256 of the applied text; empty before the first is applied.
    pub sha256: String,
    /// 1 for the manifest read at start-up, +1 per change applied.
    pub generation: u64,
    pub applied_at: SystemTime,
    /// The last change refused (since the last one applied).
    pub rejected: Option<RejectedFile>,
}

/// Why a service's version did not move back or forward.
#[derive(Debug, thiserror::Error)]
pub enum VersionMoveError {
    #[error("no service named {0:?}")]
    NoService(String),
    #[error("{0} has no previous version to roll back to")]
    NothingBack(String),
    #[error("{0} has no rolled-back version to roll forward to")]
    NothingForward(String),
}

impl Runtime {
    /// The manifest as applied, and what became of its last change.
    pub fn manifest(&self) -> ManifestStatus {
        self.manifest.lock().unwrap().clone()
    }

    /// Records that the manifest whose text has digest `sha256` was applied; its generation.
    pub fn manifest_applied(&self, sha256: String) -> u64 {
        let mut status = self.manifest.lock().unwrap();
        status.sha256 = sha256;
        status.generation += 1;
        status.applied_at = SystemTime::now();
        status.rejected = None;
        status.generation
    }

    /// Records why the last change of the manifest was refused.
    pub fn manifest_rejected(&self, rejected: RejectedFile) {
        self.manifest.lock().unwrap().rejected = Some(rejected);
    }

    /// Rolls service `name` back to its previous version, or (`forward`) forward to the one a
    /// rollback left: its new generation and version. Not while a manifest change hands the
    /// service's history to its successor.
    pub fn move_version(
        &self,
        name: &str,
        forward: bool,
    ) -> Result<(u64, Arc<Loaded>), VersionMoveError> {
        let _versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let service = self
            .service(name)
            .ok_or_else(|| VersionMoveError::NoService(name.into()))?;
        match forward {
            true => service
                .rollforward()
                .ok_or_else(|| VersionMoveError::NothingForward(name.into())),
            false => service
                .rollback()
                .ok_or_else(|| VersionMoveError::NothingBack(name.into())),
        }
    }
}
