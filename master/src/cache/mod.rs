//! The step cache (docs/cache.md): full keys ([`key`]), content-addressed output blobs
//! ([`blobs`]), and the records the store keeps for them. The engine decides when a step is
//! cacheable and records hits and misses; this module knows nothing of builds.

pub mod blobs;
pub mod key;

use serde::{Deserialize, Serialize};

/// One entry of a step's outputs, as stored (the protocol's `OutputFile`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the checkout, `/`-separated.
    pub path: String,
    pub mode: u32,
    /// `sha256:<hex>` of a regular file's content; empty for a symlink or directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
}

impl From<rbb_schema::proto::OutputFile> for OutputFile {
    fn from(f: rbb_schema::proto::OutputFile) -> OutputFile {
        OutputFile { path: f.path, mode: f.mode, digest: f.digest, size: f.size, link: f.link, dir: f.dir }
    }
}

impl From<&OutputFile> for rbb_schema::proto::OutputFile {
    fn from(f: &OutputFile) -> rbb_schema::proto::OutputFile {
        rbb_schema::proto::OutputFile {
            path: f.path.clone(),
            mode: f.mode,
            digest: f.digest.clone(),
            size: f.size,
            link: f.link.clone(),
            dir: f.dir,
        }
    }
}

/// A stored execution that later steps with the same full key reuse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The full key, `sha256:<hex>`.
    pub key: String,
    /// Where it came from.
    pub builder: String,
    pub step: String,
    pub build: u64,
    pub step_index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<u64>,
    pub files: Vec<OutputFile>,
    /// Sum of the files' sizes (uncompressed).
    pub bytes: u64,
    pub created_at: u64,
}

impl CacheEntry {
    /// Digests of the blobs the entry needs, without duplicates.
    pub fn digests(&self) -> Vec<&str> {
        let mut d: Vec<&str> = self.files.iter().filter(|f| !f.digest.is_empty()).map(|f| f.digest.as_str()).collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

/// The last successful execution of one step of one builder: a miss is explained by
/// diffing a new manifest against this one's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// Its full key.
    pub key: String,
    pub build: u64,
    pub step_index: u32,
    /// The documented fields its full key was made of (docs/cache-key.md).
    pub manifest: serde_json::Value,
    /// When it finished (Unix milliseconds).
    pub at_ms: u64,
}

/// The cache's totals, kept as counts by the store (never a scan of entries or blobs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub blobs: u64,
    /// Bytes the blobs take on disk (compressed).
    pub stored_bytes: u64,
    /// (builder, hits, misses), by builder.
    pub per_builder: Vec<(String, u64, u64)>,
}

/// What an eviction removed. The blobs' rows are gone; their files are removed by the
/// caller once the removal is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Evicted {
    pub entries: u64,
    /// Digests no entry uses any more.
    pub blobs: Vec<String>,
    /// Stored bytes those blobs took.
    pub bytes: u64,
}

impl Evicted {
    pub fn is_empty(&self) -> bool {
        self.entries == 0 && self.blobs.is_empty()
    }

    pub fn add(&mut self, other: Evicted) {
        self.entries += other.entries;
        self.blobs.extend(other.blobs);
        self.bytes += other.bytes;
    }
}
