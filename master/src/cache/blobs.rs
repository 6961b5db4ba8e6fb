//! Content-addressed blobs of step outputs under `<state dir>/cache/blobs/<2 hex>/<64 hex>`,
//! named by the SHA-256 of their uncompressed content and stored zstd-compressed.
//!
//! A blob is streamed into a temporary file of its own (`<state dir>/cache/tmp`), hashed
//! and counted as it goes, checked against its declared size and digest, synced, then
//! renamed into place: a file under `blobs/` is always whole. Reading hashes again, so a
//! file damaged on disk is caught, reported as data loss, and removed (the next upload
//! replaces it). This module knows files only: which blobs entries use is the store's.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest piece a [`BlobReader`] yields (the protocol's chunk limit).
pub const CHUNK: usize = 1 << 20;

/// zstd level: fast enough to keep up with a local network (see docs/cache.md).
const LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("`{0}` is not a blob digest (`sha256:` and 64 lowercase hex digits)")]
    BadDigest(String),
    #[error("blob {digest}: {path}: {source}")]
    Io { digest: String, path: PathBuf, source: std::io::Error },
    #[error("blob {digest} is not in the store")]
    NotFound { digest: String },
    #[error("blob {digest} is damaged in the store ({reason}); it was removed")]
    DataLoss { digest: String, reason: String },
    #[error("blob {digest} was declared as {declared} bytes but {got} arrived")]
    Size { digest: String, declared: u64, got: String },
    #[error("blob declared as {digest} has content {actual}")]
    Mismatch { digest: String, actual: String },
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

fn hex_digest(h: Sha256) -> String {
    format!("sha256:{}", rbb_schema::hex(&h.finalize()))
}

/// The blob files of one state directory.
#[derive(Debug)]
pub struct Blobs {
    root: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
}

impl Blobs {
    /// Opens (creating) `<state_dir>/cache`, and removes the temporary files an upload left
    /// when the master stopped under it.
    pub fn open(state_dir: &Path) -> Result<Blobs, BlobError> {
        let cache = state_dir.join("cache");
        let root = cache.join("blobs");
        let tmp = cache.join("tmp");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io { digest: String::new(), path, source }
        };
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let mut removed = 0;
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let p = e.map_err(io(&tmp))?.path();
            std::fs::remove_file(&p).map_err(io(&p))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, dir = %tmp.display(), "removed unfinished blob uploads");
        }
        Ok(Blobs { root, tmp, next_tmp: AtomicU64::new(0) })
    }

    /// Where the blob `digest` lives (it may not exist).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        if !valid_digest(digest) {
            return Err(BlobError::BadDigest(digest.to_owned()));
        }
        let hex = &digest[7..];
        Ok(self.root.join(&hex[..2]).join(hex))
    }

    /// Whether the blob's file exists (its content is checked when it is read).
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Removes the blob's file; a missing one is not an error.
    pub fn remove(&self, digest: &str) -> Result<(), BlobError> {
        let p = self.path(digest)?;
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(BlobError::Io { digest: digest.to_owned(), path: p, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Starts writing the blob `digest` of `size` bytes into a temporary file of its own:
    /// concurrent writers of one digest never share a file.
    pub fn writer(&self, digest: &str, size: u64) -> Result<BlobWriter, BlobError> {
        let dest = self.path(digest)?;
        let hex = &digest[7..];
        let (file, tmp) = loop {
            let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
            let tmp = self.tmp.join(format!("{hex}.{}.{n}", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => break (f, tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BlobError::Io { digest: digest.to_owned(), path: tmp, source: e }),
            }
        };
        let io = |source| BlobError::Io { digest: digest.to_owned(), path: tmp.clone(), source };
        let made = zstd::stream::write::Encoder::new(file, LEVEL).and_then(|mut enc| {
            enc.set_pledged_src_size(Some(size))?;
            enc.include_checksum(false)?;
            Ok(enc)
        });
        let enc = match made {
            Ok(enc) => enc,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(e));
            }
        };
        Ok(BlobWriter { digest: digest.to_owned(), size, written: 0, hasher: Sha256::new(), enc: Some(enc), tmp, dest })
    }

    /// Opens the blob `digest` for reading; [`BlobError::NotFound`] when it has no file.
    pub fn reader(&self, digest: &str) -> Result<BlobReader, BlobError> {
        let path = self.path(digest)?;
        let io = |source| BlobError::Io { digest: digest.to_owned(), path: path.clone(), source };
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound { digest: digest.to_owned() });
            }
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        // The frame header names the content size (the writer pledged it).
        let mut head = [0u8; 18];
        let mut got = 0;
        while got < head.len() {
            match file.read(&mut head[got..]).map_err(io)? {
                0 => break,
                n => got += n,
            }
        }
        let size = zstd::zstd_safe::get_frame_content_size(&head[..got]).ok().flatten();
        file.rewind().map_err(io)?;
        let mut reader = BlobReader {
            digest: digest.to_owned(),
            path: path.clone(),
            identity: file_identity(&meta),
            size,
            read: 0,
            hasher: Sha256::new(),
            dec: None,
            dec_error: None,
            done: false,
        };
        match zstd::stream::read::Decoder::new(file) {
            Ok(d) => reader.dec = Some(d),
            Err(e) => reader.dec_error = Some(e),
        }
        Ok(reader)
    }
}

/// (device, inode) of a file: removing a damaged blob must not remove a good copy that an
/// upload renamed into its place meanwhile.
fn file_identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// A blob being written. Dropping it unfinished removes its temporary file.
pub struct BlobWriter {
    digest: String,
    size: u64,
    written: u64,
    hasher: Sha256,
    enc: Option<zstd::stream::write::Encoder<'static, File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter").field("digest", &self.digest).field("written", &self.written).finish()
    }
}

impl BlobWriter {
    fn io(&self, source: std::io::Error) -> BlobError {
        BlobError::Io { digest: self.digest.clone(), path: self.tmp.clone(), source }
    }

    /// Drops the temporary file (the writer is unusable afterwards).
    fn discard(&mut self) {
        if self.enc.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }

    /// The next piece of the content. More bytes than declared is an error, and the
    /// temporary file is gone.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        let Some(enc) = self.enc.as_mut() else {
            return Err(self.io(std::io::Error::other("the upload was already abandoned")));
        };
        let total = self.written + chunk.len() as u64;
        if total > self.size {
            self.discard();
            return Err(BlobError::Size {
                digest: self.digest.clone(),
                declared: self.size,
                got: format!("more than {}", self.size),
            });
        }
        if let Err(e) = enc.write_all(chunk) {
            self.discard();
            return Err(self.io(e));
        }
        self.hasher.update(chunk);
        self.written = total;
        Ok(())
    }

    /// Checks the byte count and the digest, syncs the file and renames it into place.
    /// Returns the bytes it takes on disk. On any mismatch the temporary file is removed.
    pub fn finish(mut self) -> Result<u64, BlobError> {
        if self.written != self.size {
            self.discard();
            return Err(BlobError::Size {
                digest: self.digest.clone(),
                declared: self.size,
                got: self.written.to_string(),
            });
        }
        let actual = hex_digest(std::mem::take(&mut self.hasher));
        if actual != self.digest {
            self.discard();
            return Err(BlobError::Mismatch { digest: self.digest.clone(), actual });
        }
        let Some(enc) = self.enc.take() else {
            return Err(self.io(std::io::Error::other("the upload was already abandoned")));
        };
        let placed = (|| {
            let file = enc.finish()?;
            file.sync_all()?;
            let stored = file.metadata()?.len();
            drop(file);
            let dir = self.dest.parent().unwrap_or(&self.dest);
            std::fs::create_dir_all(dir)?;
            // Two writers of one digest both succeed: the content is the same, the last
            // rename wins.
            std::fs::rename(&self.tmp, &self.dest)?;
            File::open(dir)?.sync_all()?;
            Ok(stored)
        })();
        placed.map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            self.io(e)
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// A blob's uncompressed content in pieces of at most [`CHUNK`] bytes, hashed as it is read.
/// The last item is an error when the content does not match the digest: then the file is
/// removed.
pub struct BlobReader {
    digest: String,
    path: PathBuf,
    identity: (u64, u64),
    size: Option<u64>,
    read: u64,
    hasher: Sha256,
    dec: Option<zstd::stream::read::Decoder<'static, std::io::BufReader<File>>>,
    dec_error: Option<std::io::Error>,
    done: bool,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader").field("digest", &self.digest).field("read", &self.read).finish()
    }
}

impl BlobReader {
    /// The uncompressed size the file declares, if it declares one.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Removes the damaged file (unless another file took its place) and says why.
    fn lost(&mut self, reason: String) -> BlobError {
        self.done = true;
        self.dec = None;
        let same = std::fs::metadata(&self.path).is_ok_and(|m| file_identity(&m) == self.identity);
        if same && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::error!(digest = %self.digest, error = %e, "cannot remove a damaged blob");
        }
        tracing::warn!(digest = %self.digest, %reason, "removed a damaged blob");
        BlobError::DataLoss { digest: self.digest.clone(), reason }
    }
}

impl Iterator for BlobReader {
    type Item = Result<Vec<u8>, BlobError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.dec_error.take() {
            return Some(Err(self.lost(format!("cannot decompress: {e}"))));
        }
        let dec = self.dec.as_mut()?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < CHUNK {
            match dec.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(Err(self.lost(format!("cannot decompress: {e}")))),
            }
        }
        if got > 0 {
            buf.truncate(got);
            self.hasher.update(&buf);
            self.read += got as u64;
            if self.size.is_some_and(|s| self.read > s) {
                return Some(
                    Err(self.lost(format!("more content than the {} bytes declared", self.size.unwrap_or(0)))),
                );
            }
            return Some(Ok(buf));
        }
        self.done = true;
        let actual = hex_digest(std::mem::take(&mut self.hasher));
        if actual != self.digest {
            return Some(Err(self.lost(format!("its content hashes to {actual}"))));
        }
        if let Some(s) = self.size.filter(|s| *s != self.read) {
            return Some(Err(self.lost(format!("{} bytes of the {s} declared", self.read))));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(data);
        hex_digest(h)
    }

    fn put(b: &Blobs, data: &[u8]) -> Result<u64, BlobError> {
        let mut w = b.writer(&digest_of(data), data.len() as u64)?;
        for c in data.chunks(100_000) {
            w.write(c)?;
        }
        w.finish()
    }

    fn get(b: &Blobs, digest: &str) -> Result<Vec<u8>, BlobError> {
        let mut out = Vec::new();
        for c in b.reader(digest)? {
            let c = c?;
            assert!(c.len() <= CHUNK, "a chunk of {} bytes", c.len());
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    fn tmp_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("cache/tmp")).expect("tmp dir").count()
    }

    /// Bytes that do not compress to nothing.
    fn noise(n: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 { b'a' } else { x as u8 }
            })
            .collect()
    }

    #[test]
    fn digests_are_sha256_and_64_lowercase_hex() {
        assert!(valid_digest(&digest_of(b"")));
        assert!(!valid_digest("sha256:"));
        assert!(!valid_digest(&digest_of(b"").to_uppercase()));
        assert!(!valid_digest(&format!("sha1:{}", &digest_of(b"")[7..])));
        assert!(!valid_digest(&format!("{}0", digest_of(b""))));
        assert!(!valid_digest("sha256:../../../../etc/passwd"));
    }

    #[test]
    fn blobs_of_0_b_1_b_and_3_mib_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        for data in [Vec::new(), vec![7u8], noise(3 << 20)] {
            let d = digest_of(&data);
            assert!(!b.has(&d));
            let stored = put(&b, &data).expect("put");
            assert!(b.has(&d));
            let on_disk = std::fs::metadata(b.path(&d).expect("path")).expect("file").len();
            assert_eq!(stored, on_disk, "finish answers the stored size");
            let r = b.reader(&d).expect("reader");
            assert_eq!(r.size(), Some(data.len() as u64));
            assert_eq!(get(&b, &d).expect("get"), data);
            assert!(b.path(&d).expect("path").starts_with(dir.path().join("cache/blobs").join(&d[7..9])));
        }
        assert_eq!(get(&b, &digest_of(&noise(3 << 20))).expect("get").len(), 3 << 20);
        assert_eq!(b.reader(&digest_of(&noise(3 << 20))).expect("reader").count(), 3, "1 MiB chunks");
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[test]
    fn truncated_too_long_and_wrong_uploads_leave_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        let data = noise(300_000);
        let d = digest_of(&data);
        // Truncated: fewer bytes than declared.
        let mut w = b.writer(&d, data.len() as u64).expect("writer");
        w.write(&data[..1000]).expect("write");
        assert_eq!(tmp_files(dir.path()), 1);
        assert!(matches!(w.finish(), Err(BlobError::Size { .. })));
        // Abandoned: the writer is dropped mid-way.
        let mut w = b.writer(&d, data.len() as u64).expect("writer");
        w.write(&data[..1000]).expect("write");
        drop(w);
        // Too long.
        let mut w = b.writer(&d, 10).expect("writer");
        assert!(matches!(w.write(&data[..11]), Err(BlobError::Size { .. })));
        assert_eq!(tmp_files(dir.path()), 0, "refused at once");
        drop(w);
        // The right size, the wrong content.
        let mut other = data.clone();
        other[5] ^= 1;
        let mut w = b.writer(&d, data.len() as u64).expect("writer");
        w.write(&other).expect("write");
        assert!(matches!(w.finish(), Err(BlobError::Mismatch { .. })));
        assert!(!b.has(&d));
        assert_eq!(tmp_files(dir.path()), 0);
        assert!(matches!(b.reader(&d), Err(BlobError::NotFound { .. })));
        assert!(matches!(b.writer("sha256:nothex", 1), Err(BlobError::BadDigest(_))));
    }

    #[test]
    fn a_damaged_file_is_data_loss_and_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        for damage in ["truncate", "flip", "replace"] {
            let data = noise(2 << 20);
            let d = digest_of(&data);
            put(&b, &data).expect("put");
            let p = b.path(&d).expect("path");
            let mut bytes = std::fs::read(&p).expect("read");
            match damage {
                "truncate" => bytes.truncate(bytes.len() / 2),
                "flip" => {
                    let i = bytes.len() / 2;
                    bytes[i] ^= 0x55;
                }
                _ => {
                    // A valid zstd file of other content of the same size.
                    let mut other = data.clone();
                    other[0] ^= 1;
                    bytes = zstd::encode_all(&other[..], 1).expect("encode");
                }
            }
            std::fs::write(&p, bytes).expect("damage");
            match get(&b, &d) {
                Err(BlobError::DataLoss { .. }) => {}
                other => panic!("{damage}: {:?}", other.map(|v| v.len())),
            }
            assert!(!p.exists(), "{damage}: the damaged file is removed");
            // The next upload replaces it.
            put(&b, &data).expect("put again");
            assert_eq!(get(&b, &d).expect("get"), data);
        }
    }

    #[test]
    fn concurrent_writers_of_one_digest_both_succeed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = std::sync::Arc::new(Blobs::open(dir.path()).expect("open"));
        let data = std::sync::Arc::new(noise(1 << 20));
        let d = digest_of(&data);
        let mut writers: Vec<BlobWriter> = (0..4).map(|_| b.writer(&d, data.len() as u64).expect("writer")).collect();
        // Interleaved: every writer has half its content before any finishes.
        for w in &mut writers {
            w.write(&data[..data.len() / 2]).expect("write");
        }
        let threads: Vec<_> = writers
            .into_iter()
            .map(|mut w| {
                let data = data.clone();
                std::thread::spawn(move || {
                    w.write(&data[data.len() / 2..])?;
                    w.finish()
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("finish");
        }
        assert_eq!(get(&b, &d).expect("get"), *data);
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[test]
    fn opening_removes_leftover_uploads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        let mut w = b.writer(&digest_of(b"abc"), 3).expect("writer");
        w.write(b"ab").expect("write");
        // A crash: the writer never runs its drop.
        std::mem::forget(w);
        assert_eq!(tmp_files(dir.path()), 1);
        Blobs::open(dir.path()).expect("reopen");
        assert_eq!(tmp_files(dir.path()), 0);
    }
}
