//! How fast a cache hit puts a step's outputs back: restoring 100 MiB in 1,000 files from the
//! worker's local blob store (copied, size and digest checked), against `cp -r` of the same
//! tree, measured in the same run on the same disk with a warm page cache; dirty pages are
//! written out before each timed operation.
//!
//! `cargo run --release -p rbb-worker --example restore_bench [files] [total MiB] [rounds]`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rbb_worker::cache::{BlobStore, collect_outputs, restore};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let files = args.next().transpose()?.unwrap_or(1000);
    let total_mib = args.next().transpose()?.unwrap_or(100);
    let rounds = args.next().transpose()?.unwrap_or(5);
    let scratch = tempfile::tempdir()?;
    let source = scratch.path().join("source");
    let size = total_mib * 1024 * 1024 / files;
    make_tree(&source.join("out"), files, size)?;
    let patterns = vec!["out".to_owned()];
    let cancel = CancellationToken::new();

    let start = Instant::now();
    let outputs = collect_outputs(&source, &patterns, &cancel)?;
    let collect = start.elapsed();
    let store = BlobStore::open(&scratch.path().join("work"), u64::MAX)?;
    let start = Instant::now();
    for f in outputs.iter().filter(|f| !f.digest.is_empty()) {
        store.add_file(&source.join(&f.path), &f.digest, f.size, &cancel)?;
    }
    let add = start.elapsed();

    let mut restores = Vec::new();
    let mut copies = Vec::new();
    for round in 0..rounds {
        let into = scratch.path().join(format!("restore-{round}"));
        std::fs::create_dir(&into)?;
        flush()?;
        let start = Instant::now();
        let restored = restore(&into, &patterns, &outputs, &store, &cancel)?;
        restores.push(start.elapsed());
        if restored.files != files {
            bail!("restored {} files, expected {files}", restored.files);
        }

        let into = scratch.path().join(format!("copy-{round}"));
        std::fs::create_dir(&into)?;
        flush()?;
        let start = Instant::now();
        let status = Command::new("cp").arg("-r").arg(source.join("out")).arg(&into).status().context("running cp")?;
        copies.push(start.elapsed());
        if !status.success() {
            bail!("cp -r failed: {status}");
        }
        std::fs::remove_dir_all(scratch.path().join(format!("restore-{round}")))?;
        std::fs::remove_dir_all(scratch.path().join(format!("copy-{round}")))?;
    }
    let (restore_ms, copy_ms) = (median_ms(&mut restores), median_ms(&mut copies));
    println!("tree: {files} files of {size} bytes ({total_mib} MiB) in 10 directories");
    println!("collect (hash) once:          {:>8.1} ms", ms(collect));
    println!("into the local store once:    {:>8.1} ms", ms(add));
    println!("restore from the store:       {restore_ms:>8.1} ms (median of {rounds})");
    println!("cp -r of the same tree:       {copy_ms:>8.1} ms (median of {rounds})");
    println!("restore / cp -r:              {:>8.2}", restore_ms / copy_ms);
    Ok(())
}

/// Writes out what earlier rounds left dirty, so that no round pays for another's writes.
fn flush() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    ms(times[times.len() / 2])
}

/// `files` files of `size` bytes each in 10 directories, contents that differ per file.
fn make_tree(root: &Path, files: usize, size: usize) -> anyhow::Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        let dir = root.join(format!("d{:02}", i % 10));
        std::fs::create_dir_all(&dir)?;
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.join(format!("f{i:04}.bin")), data)?;
    }
    Ok(())
}
