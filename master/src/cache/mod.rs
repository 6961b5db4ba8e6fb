//! The step cache (docs/cache.md): full keys ([`key`]), content-addressed output blobs
//! ([`blobs`]) and the worker calls that move them ([`rpc`]), and the records the store
//! keeps for them. The engine decides when a step is
//! cacheable and records hits and misses; this module knows nothing of builds.

pub mod blobs;
pub mod key;
pub mod rpc;

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

/// `cache.max_size` when the config does not set it: 10 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 30;

/// A size: bytes, or a number with a suffix `k`, `m` or `g` (powers of 1024; upper case
/// and a trailing `b` or `ib` are accepted: `512M`, `2GiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        _ => (body, 0),
    };
    let bad = || format!("`{t}` is not a size (bytes, or a number with a suffix k, m or g, as in `10g`)");
    let digits = digits.trim();
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{t}` is too large"))
}

/// The cache's size limit from the master config (`cache.max_size`).
pub fn max_size(config: Option<&rbb_schema::config::CacheConfig>) -> Result<u64, String> {
    match config.and_then(|c| c.max_size.as_deref()) {
        None => Ok(DEFAULT_MAX_SIZE),
        Some(v) => parse_size(v).map_err(|e| format!("cache.max_size: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bytes_or_powers_of_1024() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size(" 512M "), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("7b"), Ok(7));
        for bad in ["", "g", "1.5g", "-1", "10x", "ten", "1 0g", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size("99999999999g").is_err(), "overflow");
        assert_eq!(max_size(None), Ok(DEFAULT_MAX_SIZE));
        let c = rbb_schema::config::CacheConfig { max_size: Some("10x".into()) };
        assert!(max_size(Some(&c)).is_err_and(|e| e.starts_with("cache.max_size: `10x`")));
    }
}
