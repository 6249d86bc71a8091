//! The organization keys as the config names them: each key's id (what logs, metrics and the
//! usage history carry, never the key), its value, and the file it was read from.

use std::path::PathBuf;

use super::OrgApiKey;

/// The id of the key from `upstream.api_key_env` / `upstream.api_key_file`.
pub const DEFAULT_KEY_ID: &str = "default";

/// One organization key and where it came from.
#[derive(Debug, Clone)]
pub struct NamedKey {
    pub id: String,
    pub key: OrgApiKey,
    /// The file it was read from, if any (watched, and read again at a reload).
    pub file: Option<PathBuf>,
}

/// Every key in force, and which one serves tenants that name none.
#[derive(Debug, Clone)]
pub struct OrgKeys {
    pub keys: Vec<NamedKey>,
    pub default: Option<String>,
}

impl OrgKeys {
    pub fn get(&self, id: &str) -> Option<&NamedKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.keys.iter().filter_map(|k| k.file.as_ref())
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }
}
