//! Step logs: one append-only file per step under `<state>/logs/`, written as chunks arrive
//! and readable (by byte range) while still growing. Memory use does not depend on log
//! size: chunks go straight to the file. The store keeps the index (which file, how long).
//!
//! Which stream (stdout, stderr, header) each byte came from is kept beside the log in a
//! sidecar of stream *switches* (`<id>.streams`): fixed records of the byte offset where a
//! run of one stream starts and the stream, appended only when the stream changes, so a
//! 50 MiB stdout log has an empty sidecar. A switch is written before the bytes it labels:
//! a crash can lose the tail of either, never label bytes with the wrong stream. A log
//! without a sidecar (written by an older version) reads as all stdout.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Size of one sidecar record: the offset (u64, little-endian) and the stream (one byte).
const SWITCH_LEN: u64 = 9;

/// The stream a log's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stream {
    #[default]
    Stdout,
    Stderr,
    /// Lines the worker writes itself (checkout progress, the command, the exit status).
    Header,
}

impl Stream {
    /// From the wire's `LogStream` number; an unknown number reads as stdout.
    pub fn from_wire(n: i32) -> Stream {
        match rbb_schema::proto::LogStream::try_from(n) {
            Ok(rbb_schema::proto::LogStream::Stderr) => Stream::Stderr,
            Ok(rbb_schema::proto::LogStream::Header) => Stream::Header,
            _ => Stream::Stdout,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Header => "header",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::Header => 2,
        }
    }

    fn from_byte(b: u8) -> Stream {
        match b {
            1 => Stream::Stderr,
            2 => Stream::Header,
            _ => Stream::Stdout,
        }
    }
}

/// A run of one stream: it starts at byte `offset` and lasts until the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub stream: Stream,
}

/// An open log: its file, length, sidecar (made at the first switch) and current stream.
struct Open {
    file: File,
    len: u64,
    streams: Option<File>,
    stream: Stream,
}

pub struct LogFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Open>>,
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

    /// The stream sidecar's name of a log file (plain or compressed): `0001/1234.streams`.
    pub fn streams_name(file: &str) -> String {
        let plain = file.strip_suffix(".zst").unwrap_or(file);
        format!("{}.streams", plain.strip_suffix(".log").unwrap_or(plain))
    }

    /// Creates (or truncates) log `id`'s file and keeps it open for appending.
    pub fn create(&self, id: u64) -> std::io::Result<String> {
        let name = Self::file_name(id);
        let path = self.dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        // A sidecar left by an earlier file of this id would label the new bytes.
        match std::fs::remove_file(self.dir.join(Self::streams_name(&name))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let open = Open { file, len: 0, streams: None, stream: Stream::Stdout };
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, open);
        Ok(name)
    }

    /// Appends `stream`'s bytes to an open log; returns its new length. Unknown (closed)
    /// logs are ignored. A change of stream first appends a switch to the sidecar.
    pub fn append(&self, id: u64, stream: Stream, data: &[u8]) -> std::io::Result<Option<u64>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = open.get_mut(&id) else {
            return Ok(None);
        };
        if stream != o.stream && !data.is_empty() {
            let sidecar = match &mut o.streams {
                Some(f) => f,
                None => {
                    let path = self.dir.join(Self::streams_name(&Self::file_name(id)));
                    o.streams.insert(OpenOptions::new().create(true).append(true).open(path)?)
                }
            };
            let mut rec = [0u8; SWITCH_LEN as usize];
            rec[..8].copy_from_slice(&o.len.to_le_bytes());
            rec[8] = stream.byte();
            sidecar.write_all(&rec)?;
            o.stream = stream;
        }
        o.file.write_all(data)?;
        o.len += data.len() as u64;
        Ok(Some(o.len))
    }

    /// Current length of an open log.
    pub fn len(&self, id: u64) -> Option<u64> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|o| o.len)
    }

    /// The runs of log `file` overlapping bytes `[from, to)`: the run holding `from` (its
    /// own start may be before `from`), then every run starting before `to`. Reads only the
    /// sidecar records it needs (a binary search, then the range). Without a sidecar the
    /// log is one stdout run.
    pub fn runs(&self, file: &str, from: u64, to: u64) -> std::io::Result<Vec<Run>> {
        use std::os::unix::fs::FileExt;
        let sidecar = match File::open(self.dir.join(Self::streams_name(file))) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(vec![Run { offset: 0, stream: Stream::Stdout }]);
            }
            Err(e) => return Err(e),
        };
        // A torn last record (a crash mid-write) is not read.
        let count = sidecar.metadata()?.len() / SWITCH_LEN;
        let read = |i: u64| -> std::io::Result<Run> {
            let mut rec = [0u8; SWITCH_LEN as usize];
            sidecar.read_exact_at(&mut rec, i * SWITCH_LEN)?;
            let mut off = [0u8; 8];
            off.copy_from_slice(&rec[..8]);
            Ok(Run { offset: u64::from_le_bytes(off), stream: Stream::from_byte(rec[8]) })
        };
        // The first record starting after `from`.
        let (mut lo, mut hi) = (0, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if read(mid)?.offset <= from { lo = mid + 1 } else { hi = mid }
        }
        let first = if lo == 0 { Run { offset: 0, stream: Stream::Stdout } } else { read(lo - 1)? };
        let mut out = vec![first];
        for i in lo..count {
            let r = read(i)?;
            if r.offset >= to {
                break;
            }
            // Two switches at one offset (the first labelled no byte): the later one holds.
            match out.last_mut() {
                Some(last) if last.offset == r.offset => *last = r,
                _ => out.push(r),
            }
        }
        Ok(out)
    }

    /// Closes a log; returns its final length. The data is in the OS's hands already: a
    /// killed master loses nothing; only a machine crash can lose a log's last writes.
    pub fn close(&self, id: u64) -> Option<u64> {
        let o = self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)?;
        Some(o.len)
    }

    /// Compresses a finished log's file with zstd into `<file>.zst` (written whole and
    /// synced before the original goes); returns the new file name. The stream sidecar,
    /// a few bytes per switch, stays as it is beside it.
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

    /// Removes a log's file (with its stream sidecar and decompressed copy). A file already
    /// gone is no error.
    pub fn delete(&self, file: &str) -> std::io::Result<()> {
        for p in [
            self.dir.join(file),
            self.dir.join(Self::streams_name(file)),
            self.dir.join("cache").join(file.trim_end_matches(".zst")),
        ] {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, stream: Stream) -> Run {
        Run { offset, stream }
    }

    /// A log of header, stdout, stderr and stdout again, written in several chunks.
    fn mixed(logs: &LogFiles, id: u64) -> String {
        let file = logs.create(id).expect("create");
        for (stream, data) in [
            (Stream::Header, &b"$ make\n"[..]),  // 0..7
            (Stream::Stdout, b"out 1\n"),        // 7..13
            (Stream::Stdout, b"out 2\n"),        // 13..19
            (Stream::Stderr, b""),               // no byte: no switch
            (Stream::Stderr, b"err 1\nerr 2\n"), // 19..31
            (Stream::Stdout, b"out 3\n"),        // 31..37
        ] {
            logs.append(id, stream, data).expect("append");
        }
        assert_eq!(logs.close(id), Some(37));
        file
    }

    #[test]
    fn stream_switches_are_kept_beside_the_log_and_read_by_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LogFiles::new(dir.path()).expect("logs");
        let file = mixed(&logs, 1);
        let sidecar = logs.path(&LogFiles::streams_name(&file));
        // One record per switch: header at 0, stdout at 7, stderr at 19, stdout at 31.
        assert_eq!(std::fs::metadata(&sidecar).expect("sidecar").len(), 4 * SWITCH_LEN);
        let all =
            vec![run(0, Stream::Header), run(7, Stream::Stdout), run(19, Stream::Stderr), run(31, Stream::Stdout)];
        assert_eq!(logs.runs(&file, 0, u64::MAX).expect("runs"), all);
        // A page starting inside the stderr run gets that run (starting before the page).
        assert_eq!(logs.runs(&file, 25, 30).expect("runs"), vec![run(19, Stream::Stderr)]);
        assert_eq!(logs.runs(&file, 25, 32).expect("runs"), vec![run(19, Stream::Stderr), run(31, Stream::Stdout)]);
        // A page ending right where a run starts does not hold it.
        assert_eq!(logs.runs(&file, 8, 19).expect("runs"), vec![run(7, Stream::Stdout)]);
        assert_eq!(logs.runs(&file, 19, 20).expect("runs"), vec![run(19, Stream::Stderr)]);
        // A torn last record (a crash mid-write) is not read.
        let mut f = OpenOptions::new().append(true).open(&sidecar).expect("sidecar");
        f.write_all(&[40, 0, 0]).expect("torn");
        assert_eq!(logs.runs(&file, 0, u64::MAX).expect("runs"), all);

        // Compressed: the sidecar stays and still answers; deleted with the log.
        let zst = logs.compress(&file).expect("compress");
        assert_eq!(logs.runs(&zst, 25, 30).expect("runs"), vec![run(19, Stream::Stderr)]);
        logs.delete(&zst).expect("delete");
        assert!(!sidecar.exists() && !logs.path(&zst).exists());
        // A log with no sidecar (an older version's, or gone) reads as all stdout.
        assert_eq!(logs.runs(&zst, 25, 30).expect("runs"), vec![run(0, Stream::Stdout)]);
    }

    #[test]
    fn a_stdout_only_log_has_no_sidecar() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LogFiles::new(dir.path()).expect("logs");
        let file = logs.create(7).expect("create");
        for _ in 0..100 {
            logs.append(7, Stream::Stdout, &[b'x'; 1000]).expect("append");
        }
        assert_eq!(logs.close(7), Some(100_000));
        assert!(!logs.path(&LogFiles::streams_name(&file)).exists());
        assert_eq!(logs.runs(&file, 50_000, 60_000).expect("runs"), vec![run(0, Stream::Stdout)]);
        // A log made again under the same id does not inherit an older sidecar.
        let file = mixed(&logs, 8);
        logs.create(8).expect("create again");
        logs.append(8, Stream::Stdout, b"plain").expect("append");
        assert_eq!(logs.runs(&file, 0, u64::MAX).expect("runs"), vec![run(0, Stream::Stdout)]);
    }
}
