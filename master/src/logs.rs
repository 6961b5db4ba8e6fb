//! Step logs: one append-only file per step under `<state>/logs/`, written as chunks arrive
//! and readable (by byte range) while still growing. Memory use does not depend on log
//! size: chunks go straight to the file. The store keeps the index (which file, how long).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct LogFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u64, (File, u64)>>,
}

impl LogFiles {
    pub fn new(dir: &Path) -> std::io::Result<LogFiles> {
        std::fs::create_dir_all(dir)?;
        Ok(LogFiles { dir: dir.to_owned(), open: Mutex::new(HashMap::new()) })
    }

    /// The file name (relative to the log directory) of log `id`.
    pub fn file_name(id: u64) -> String {
        format!("{:04}/{id}.log", id / 1000)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates (or truncates) log `id`'s file and keeps it open for appending.
    pub fn create(&self, id: u64) -> std::io::Result<String> {
        let name = Self::file_name(id);
        let path = self.dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (file, 0));
        Ok(name)
    }

    /// Appends to an open log; returns its new length. Unknown (closed) logs are ignored.
    pub fn append(&self, id: u64, data: &[u8]) -> std::io::Result<Option<u64>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some((file, len)) = open.get_mut(&id) else {
            return Ok(None);
        };
        file.write_all(data)?;
        *len += data.len() as u64;
        Ok(Some(*len))
    }

    /// Current length of an open log.
    pub fn len(&self, id: u64) -> Option<u64> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|(_, l)| *l)
    }

    /// Closes a log; returns its final length. The data is in the OS's hands already: a
    /// killed master loses nothing; only a machine crash can lose a log's last writes.
    pub fn close(&self, id: u64) -> Option<u64> {
        let (_file, len) = self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)?;
        Some(len)
    }

    /// Compresses a finished log's file with zstd into `<file>.zst` (written whole and
    /// synced before the original goes); returns the new file name.
    pub fn compress(&self, file: &str) -> std::io::Result<String> {
        let zst = format!("{file}.zst");
        let tmp = self.dir.join(format!("{zst}.tmp"));
        {
            let mut input = File::open(self.dir.join(file))?;
            let out = File::create(&tmp)?;
            let mut enc = zstd::Encoder::new(out, 3)?;
            std::io::copy(&mut input, &mut enc)?;
            enc.finish()?.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(&zst))?;
        std::fs::remove_file(self.dir.join(file))?;
        Ok(zst)
    }

    /// A readable plain copy of a compressed log, decompressed once into `cache/` (the
    /// janitor clears the cache).
    pub fn readable(&self, file: &str) -> std::io::Result<PathBuf> {
        let Some(plain) = file.strip_suffix(".zst") else { return Ok(self.dir.join(file)) };
        let cached = self.dir.join("cache").join(plain);
        if cached.exists() {
            return Ok(cached);
        }
        if let Some(parent) = cached.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = cached.with_extension("tmp");
        {
            let mut dec = zstd::Decoder::new(File::open(self.dir.join(file))?)?;
            let mut out = File::create(&tmp)?;
            std::io::copy(&mut dec, &mut out)?;
        }
        std::fs::rename(&tmp, &cached)?;
        Ok(cached)
    }

    /// Removes a log's file (and its decompressed copy). A file already gone is no error.
    pub fn delete(&self, file: &str) -> std::io::Result<()> {
        for p in [self.dir.join(file), self.dir.join("cache").join(file.trim_end_matches(".zst"))] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Empties the cache of decompressed logs.
    pub fn clear_cache(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.dir.join("cache")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Length of a log file on disk (for logs that were open when the master stopped).
    pub fn size_on_disk(&self, file: &str) -> u64 {
        std::fs::metadata(self.dir.join(file)).map(|m| m.len()).unwrap_or(0)
    }
}
