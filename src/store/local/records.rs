//! The records of the single-node store (tenant keys and grants issued at runtime): in
//! `<state>.records` beside the state file, rewritten atomically under the state file's lock
//! at each change, so that every process sharing the state file (the two of an upgrade) reads
//! the same. Without a state file they live in this process's memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{in_file, write_atomically, LocalStore};
use crate::store::StoreError;

/// What the records file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct RecordsFile {
    version: u64,
    #[serde(default)]
    records: BTreeMap<String, String>,
    #[serde(default)]
    used: BTreeMap<String, i64>,
}

fn records_path(state: &Path) -> PathBuf {
    super::beside(state, ".records")
}

fn read(path: &Path) -> Result<RecordsFile, StoreError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RecordsFile::default()),
        Err(e) => return Err(StoreError(in_file(path, e).to_string())),
    };
    serde_json::from_slice(&text).map_err(|e| StoreError(format!("{}: {e}", path.display())))
}

impl LocalStore {
    /// The records as they are now.
    pub(super) fn read_records(&self) -> Result<RecordsFile, StoreError> {
        match &self.path {
            Some(p) => read(&records_path(p)),
            None => Ok(self.records().clone()),
        }
    }

    /// Change the records with `f` (which says whether it changed anything), under the state
    /// file's lock, and write them back when it did.
    pub(super) fn change_records<T>(
        &self,
        f: impl FnOnce(&mut RecordsFile) -> (bool, T),
    ) -> Result<T, StoreError> {
        let Some(state) = &self.path else {
            let mut r = self.records();
            return Ok(f(&mut r).1);
        };
        let _lock = self.lock_file().map_err(|e| StoreError(e.to_string()))?;
        let path = records_path(state);
        let mut r = read(&path)?;
        let (changed, out) = f(&mut r);
        if changed {
            let text = serde_json::to_vec(&r).map_err(|e| StoreError(e.to_string()))?;
            write_atomically(&path, &text)
                .map_err(|e| StoreError(in_file(&path, e).to_string()))?;
        }
        Ok(out)
    }
}

impl RecordsFile {
    pub(super) fn version(&self) -> u64 {
        self.version
    }

    pub(super) fn all(&self) -> BTreeMap<String, String> {
        self.records.clone()
    }

    pub(super) fn used(&self) -> BTreeMap<String, i64> {
        self.used.clone()
    }

    /// `Records::swap` on the file's content: whether it wrote.
    pub(super) fn swap(&mut self, id: &str, expected: Option<&str>, value: Option<&str>) -> bool {
        if self.records.get(id).map(String::as_str) != expected {
            return false;
        }
        match value {
            Some(v) => {
                self.records.insert(id.to_string(), v.to_string());
            }
            None => {
                self.records.remove(id);
                self.used.remove(id);
            }
        }
        self.version += 1;
        true
    }

    /// Note the later of two uses: whether anything moved.
    pub(super) fn touch(&mut self, used: &[(String, i64)]) -> bool {
        let mut moved = false;
        for (id, at) in used {
            let e = self.used.entry(id.clone()).or_default();
            if *at > *e {
                *e = *at;
                moved = true;
            }
        }
        moved
    }
}
