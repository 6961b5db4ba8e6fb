//! The step cache's files on real trees in temp dirs: collecting outputs, the local blob
//! store, and restoring an entry into a checkout.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::Path;

use rbb_schema::proto::OutputFile;
use rbb_worker::cache::{BlobStore, CacheError, DEFAULT_MAX_BYTES, collect_outputs, restore, sha256_of};
use tokio_util::sync::CancellationToken;

/// What a tree holds, by relative path: a file's mode and content, a symlink's target, a
/// directory's mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(u32, Vec<u8>),
    Link(String),
    Dir(u32),
}

fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut nodes = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            let node = if meta.file_type().is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap().to_str().unwrap().to_owned())
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir(mode)
            } else {
                Node::File(mode, std::fs::read(&path).unwrap())
            };
            nodes.insert(rel, node);
        }
    }
    nodes
}

fn write(root: &Path, rel: &str, content: &[u8], mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(root: &Path, rel: &str, mode: u32) {
    let path = root.join(rel);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn link(root: &Path, rel: &str, target: &str) {
    symlink(target, root.join(rel)).unwrap();
}

/// Bytes that do not repeat in any short period, so a misplaced chunk changes the digest.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const PATTERNS: [&str; 5] = ["out", "out/bin/tool", "logs/*.log", "missing/*.o", "nothing"];

fn patterns() -> Vec<String> {
    PATTERNS.iter().map(|p| (*p).to_owned()).collect()
}

/// A checkout whose outputs hold files of several modes, a big file, two files with the same
/// content, empty directories and relative symlinks; and files that are no output.
fn build_checkout(root: &Path) {
    write(root, "out/bin/tool", b"#!/bin/sh\necho hi\n", 0o755);
    write(root, "out/lib/data.txt", b"data\n", 0o640);
    write(root, "out/lib/same.txt", b"data\n", 0o644);
    write(root, "out/ro.txt", b"read only\n", 0o444);
    write(root, "out/big.bin", &noise(3 * 1024 * 1024 + 17), 0o644);
    write(root, "out/zero.bin", b"", 0o600);
    mkdir(root, "out/empty", 0o750);
    mkdir(root, "out/nested/deeper", 0o755);
    link(root, "out/link", "bin/tool");
    link(root, "out/lib/up", "../bin");
    link(root, "out/dangling", "not/there");
    write(root, "logs/a.log", b"a\n", 0o644);
    write(root, "logs/b.log", b"b\n", 0o644);
    write(root, "logs/keep.txt", b"not an output\n", 0o644);
    write(root, "src/main.c", b"int main(void) { return 0; }\n", 0o644);
    mkdir(root, ".git/objects", 0o755);
    write(root, ".git/HEAD", b"ref: refs/heads/main\n", 0o644);
}

/// The part of `tree` the outputs of [`build_checkout`] cover.
fn outputs_only(mut nodes: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    nodes.retain(|path, _| path == "out" || path.starts_with("out/") || path == "logs" || path.ends_with(".log"));
    nodes
}

/// Copies every regular file of `files` into the store, as an upload does.
fn store_all(store: &BlobStore, checkout: &Path, files: &[OutputFile]) {
    for f in files.iter().filter(|f| !f.digest.is_empty()) {
        store.add_file(&checkout.join(&f.path), &f.digest, f.size, &CancellationToken::new()).unwrap();
    }
}

struct Setup {
    _scratch: tempfile::TempDir,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    store: BlobStore,
    files: Vec<OutputFile>,
}

/// A checkout `a` with outputs, collected and stored; an empty checkout `b`.
fn setup() -> Setup {
    let scratch = tempfile::tempdir().unwrap();
    let a = scratch.path().join("a");
    let b = scratch.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    build_checkout(&a);
    let store = BlobStore::open(&scratch.path().join("work"), DEFAULT_MAX_BYTES).unwrap();
    let files = collect_outputs(&a, &patterns(), &CancellationToken::new()).unwrap();
    store_all(&store, &a, &files);
    Setup { _scratch: scratch, a, b, store, files }
}

#[test]
fn collect_then_restore_gives_an_identical_tree() {
    let s = setup();
    let paths: Vec<&str> = s.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "logs/a.log",
            "logs/b.log",
            "out/big.bin",
            "out/bin/tool",
            "out/dangling",
            "out/empty",
            "out/lib/data.txt",
            "out/lib/same.txt",
            "out/lib/up",
            "out/link",
            "out/nested/deeper",
            "out/ro.txt",
            "out/zero.bin",
        ],
        "sorted, without duplicates (out/bin/tool is matched twice), without what no pattern matches"
    );
    let by_path: BTreeMap<&str, &OutputFile> = s.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let tool = by_path["out/bin/tool"];
    assert_eq!((tool.mode, tool.size), (0o755, 18));
    assert_eq!(tool.digest, sha256_of(b"#!/bin/sh\necho hi\n"));
    assert_eq!(by_path["out/lib/data.txt"].digest, by_path["out/lib/same.txt"].digest);
    assert_eq!(by_path["out/big.bin"].digest, sha256_of(&noise(3 * 1024 * 1024 + 17)));
    assert_eq!(by_path["out/zero.bin"].digest, sha256_of(b""));
    assert_eq!(by_path["out/lib/up"].link, "../bin");
    assert!(by_path["out/lib/up"].digest.is_empty() && !by_path["out/lib/up"].dir);
    assert!(by_path["out/empty"].dir && by_path["out/empty"].mode == 0o750);
    assert!(s.files.iter().all(|f| !f.path.contains("..") && !f.path.starts_with('/')));

    let restored = restore(&s.b, &patterns(), &s.files, &s.store, &CancellationToken::new()).unwrap();
    assert_eq!(restored.files, 11, "regular files and symlinks");
    assert_eq!(restored.bytes, s.files.iter().map(|f| f.size).sum::<u64>());
    assert_eq!(tree(&s.b), outputs_only(tree(&s.a)));
}

#[test]
fn restored_files_are_copies_not_links_to_the_store() {
    let s = setup();
    restore(&s.b, &patterns(), &s.files, &s.store, &CancellationToken::new()).unwrap();
    let data = by_path(&s.files, "out/lib/data.txt");
    let blob = s.store.blob_path(&data.digest).unwrap();
    let restored = std::fs::metadata(s.b.join("out/lib/data.txt")).unwrap();
    assert_ne!(restored.ino(), std::fs::metadata(&blob).unwrap().ino());
    assert_eq!(restored.nlink(), 1);

    // A later step changing the file does not change the cache.
    std::fs::set_permissions(s.b.join("out/lib/data.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(s.b.join("out/lib/data.txt"), b"changed by a later step\n").unwrap();
    assert_eq!(std::fs::read(&blob).unwrap(), b"data\n");
    let c = s.b.parent().unwrap().join("c");
    std::fs::create_dir_all(&c).unwrap();
    restore(&c, &patterns(), &s.files, &s.store, &CancellationToken::new()).unwrap();
    assert_eq!(std::fs::read(c.join("out/lib/data.txt")).unwrap(), b"data\n");
}

fn by_path<'a>(files: &'a [OutputFile], path: &str) -> &'a OutputFile {
    files.iter().find(|f| f.path == path).unwrap()
}

#[test]
fn patterns_matching_nothing_yield_no_files() {
    let scratch = tempfile::tempdir().unwrap();
    build_checkout(scratch.path());
    let nothing: Vec<String> = ["missing/*.o", "gone", "out/*.none", "out/bin/tool/inside", "**/*.none"]
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    let files = collect_outputs(scratch.path(), &nothing, &CancellationToken::new()).unwrap();
    assert!(files.is_empty(), "{files:?}");

    // `**` reaches every depth but never into .git.
    let deep = collect_outputs(scratch.path(), &["**/*.txt".to_owned()], &CancellationToken::new()).unwrap();
    let paths: Vec<&str> = deep.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["logs/keep.txt", "out/lib/data.txt", "out/lib/same.txt", "out/ro.txt"]);
    let git = collect_outputs(scratch.path(), &["**/HEAD".to_owned()], &CancellationToken::new()).unwrap();
    assert!(git.is_empty(), "{git:?}");
}

#[test]
fn escaping_symlinks_are_refused() {
    for (target, why) in [("../../etc", "climbs out"), ("/etc/passwd", "absolute"), ("../../../x", "climbs out")] {
        let scratch = tempfile::tempdir().unwrap();
        write(scratch.path(), "out/ok.txt", b"ok\n", 0o644);
        link(scratch.path(), "out/inside", "../src");
        link(scratch.path(), "out/evil", target);
        match collect_outputs(scratch.path(), &["out".to_owned()], &CancellationToken::new()) {
            Err(CacheError::Refused { path, reason }) => {
                assert_eq!(path, "out/evil", "{why}");
                assert!(reason.contains("outside the checkout"), "{reason}");
            }
            other => panic!("a symlink to {target} ({why}) must be refused, got {other:?}"),
        }
    }
    // A symlink on the way to an output is refused too: reading through it could leave the
    // checkout.
    let scratch = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    write(elsewhere.path(), "tool", b"outside\n", 0o755);
    symlink(elsewhere.path(), scratch.path().join("out")).unwrap();
    let refused = collect_outputs(scratch.path(), &["out/tool".to_owned()], &CancellationToken::new());
    assert!(matches!(&refused, Err(CacheError::Refused { path, .. }) if path == "out"), "{refused:?}");
}

#[test]
fn bad_patterns_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    for bad in ["/etc", "../x", "out/../../x", ".", ".git", "out/[z-a"] {
        let result = collect_outputs(scratch.path(), &[bad.to_owned()], &CancellationToken::new());
        assert!(matches!(result, Err(CacheError::BadPattern { .. })), "{bad:?}: {result:?}");
    }
}

#[test]
fn restore_replaces_what_is_at_the_output_paths() {
    let s = setup();
    write(&s.b, "out/stale.txt", b"from an older build\n", 0o644);
    write(&s.b, "out/bin/tool", b"old tool\n", 0o600);
    write(&s.b, "out/locked/inner.txt", b"x\n", 0o644);
    mkdir(&s.b, "out/locked", 0o555);
    link(&s.b, "out/empty", "somewhere");
    write(&s.b, "logs/old.log", b"old\n", 0o644);
    write(&s.b, "logs/keep.txt", b"not an output\n", 0o644);
    write(&s.b, "src/keep.c", b"kept\n", 0o644);

    restore(&s.b, &patterns(), &s.files, &s.store, &CancellationToken::new()).unwrap();
    let after = tree(&s.b);
    assert_eq!(outputs_only(after.clone()), outputs_only(tree(&s.a)), "stale files at output paths are gone");
    assert_eq!(after["logs/keep.txt"], Node::File(0o644, b"not an output\n".to_vec()));
    assert_eq!(after["src/keep.c"], Node::File(0o644, b"kept\n".to_vec()));
}

#[test]
fn a_corrupt_local_blob_is_detected_and_the_checkout_left_alone() {
    let s = setup();
    let data = by_path(&s.files, "out/lib/data.txt").clone();
    let blob = s.store.blob_path(&data.digest).unwrap();
    std::fs::write(&blob, b"DATA\n").unwrap();
    assert!(s.store.contains(&data.digest, data.size), "same size: only the content tells");
    write(&s.b, "out/stale.txt", b"before\n", 0o644);
    let before = tree(&s.b);

    match restore(&s.b, &patterns(), &s.files, &s.store, &CancellationToken::new()) {
        Err(CacheError::Corrupt { digest, .. }) => assert_eq!(digest, data.digest),
        other => panic!("expected a corrupt blob, got {other:?}"),
    }
    assert_eq!(tree(&s.b), before, "nothing was touched");
    assert!(!s.store.contains(&data.digest, data.size), "the corrupt blob is gone, to be fetched again");
}

#[test]
fn entries_outside_the_outputs_are_refused() {
    let s = setup();
    let file = |path: &str| OutputFile {
        path: path.to_owned(),
        mode: 0o644,
        digest: sha256_of(b"data\n"),
        size: 5,
        ..OutputFile::default()
    };
    let bad_entries: Vec<(&str, OutputFile)> = vec![
        ("not in the outputs", file("src/evil.c")),
        ("climbs out", file("out/../../evil")),
        ("absolute", file("/tmp/evil")),
        ("empty component", file("out//x")),
        ("into .git", file(".git/hooks/pre-commit")),
        ("escaping link", OutputFile { path: "out/l".into(), link: "../../etc".into(), ..OutputFile::default() }),
        ("absolute link", OutputFile { path: "out/l".into(), link: "/etc".into(), ..OutputFile::default() }),
        ("bad digest", OutputFile { digest: "sha256:XYZ".into(), ..file("out/x") }),
        ("two kinds", OutputFile { dir: true, ..file("out/x") }),
        ("no kind", OutputFile { path: "out/x".into(), ..OutputFile::default() }),
    ];
    write(&s.b, "out/stale.txt", b"before\n", 0o644);
    let before = tree(&s.b);
    for (why, entry) in bad_entries {
        let result = restore(&s.b, &patterns(), &[entry], &s.store, &CancellationToken::new());
        assert!(matches!(result, Err(CacheError::BadEntry { .. })), "{why}: {result:?}");
    }
    let nested = [file("out/x"), file("out/x/y")];
    let result = restore(&s.b, &patterns(), &nested, &s.store, &CancellationToken::new());
    assert!(matches!(result, Err(CacheError::BadEntry { .. })), "a file inside a file: {result:?}");
    assert_eq!(tree(&s.b), before, "nothing was touched");
}

#[test]
fn restore_never_writes_through_a_symlink() {
    let s = setup();
    let elsewhere = tempfile::tempdir().unwrap();
    symlink(elsewhere.path(), s.b.join("out")).unwrap();
    let tool = by_path(&s.files, "out/bin/tool").clone();
    let result = restore(&s.b, &["out/bin/tool".to_owned()], &[tool], &s.store, &CancellationToken::new());
    assert!(matches!(&result, Err(CacheError::Refused { path, .. }) if path == "out"), "{result:?}");
    assert!(tree(elsewhere.path()).is_empty(), "nothing was written outside the checkout");

    // With the whole `out` as the output, the symlink itself is replaced.
    let whole: Vec<OutputFile> = s.files.iter().filter(|f| f.path.starts_with("out/")).cloned().collect();
    restore(&s.b, &["out".to_owned()], &whole, &s.store, &CancellationToken::new()).unwrap();
    assert!(std::fs::symlink_metadata(s.b.join("out")).unwrap().is_dir());
    assert!(tree(elsewhere.path()).is_empty());
}

#[test]
fn the_store_refuses_a_file_that_changed() {
    let scratch = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&scratch.path().join("work"), DEFAULT_MAX_BYTES).unwrap();
    write(scratch.path(), "f", b"now\n", 0o644);
    let stale = sha256_of(b"was\n");
    let result = store.add_file(&scratch.path().join("f"), &stale, 4, &CancellationToken::new());
    assert!(matches!(result, Err(CacheError::Changed { .. })), "{result:?}");
    assert!(!store.contains(&stale, 4));
    assert!(std::fs::read_dir(scratch.path().join("work/.rbb-cache/tmp")).unwrap().next().is_none(), "no temp left");

    let digest = sha256_of(b"now\n");
    store.add_file(&scratch.path().join("f"), &digest, 4, &CancellationToken::new()).unwrap();
    let path = store.blob_path(&digest).unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(path, scratch.path().join(format!("work/.rbb-cache/blobs/{}/{hex}", &hex[..2])));
    assert_eq!(std::fs::read(path).unwrap(), b"now\n");
}

#[test]
fn a_cancelled_collection_stops() {
    let scratch = tempfile::tempdir().unwrap();
    build_checkout(scratch.path());
    let cancel = CancellationToken::new();
    cancel.cancel();
    let result = collect_outputs(scratch.path(), &patterns(), &cancel);
    assert!(matches!(result, Err(CacheError::Cancelled)), "{result:?}");
}

#[test]
fn a_file_in_the_way_is_refused_before_anything_is_removed() {
    let s = setup();
    let patterns = vec!["out/**/*.txt".to_owned(), "logs/*.log".to_owned()];
    let files = collect_outputs(&s.a, &patterns, &CancellationToken::new()).unwrap();
    assert!(files.iter().any(|f| f.path == "out/lib/data.txt"));
    // `out/lib` is a file here, and no pattern matches it: the entry cannot be put in place.
    write(&s.b, "out/lib", b"a file where a directory must go\n", 0o644);
    write(&s.b, "logs/old.log", b"would be removed by a restore\n", 0o644);
    let before = tree(&s.b);
    let result = restore(&s.b, &patterns, &files, &s.store, &CancellationToken::new());
    assert!(matches!(&result, Err(CacheError::Refused { path, .. }) if path == "out/lib"), "{result:?}");
    assert_eq!(tree(&s.b), before, "nothing was removed");
}

#[test]
fn the_store_keeps_the_most_recently_used_blobs_within_its_limit() {
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path().join("work");
    let store = BlobStore::open(&work, 100).unwrap();
    let mut blobs = Vec::new();
    for i in 0..5u8 {
        let content = vec![b'a' + i; 30];
        let src = scratch.path().join(format!("f{i}"));
        std::fs::write(&src, &content).unwrap();
        let digest = sha256_of(&content);
        store.add_file(&src, &digest, 30, &CancellationToken::new()).unwrap();
        // Stored on day i: blob 0 is the least recently used.
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * (u64::from(i) + 1));
        let blob = std::fs::File::options().write(true).open(store.blob_path(&digest).unwrap()).unwrap();
        blob.set_modified(when).unwrap();
        blobs.push(digest);
    }
    assert_eq!(store.bytes(), 150);
    assert_eq!(store.trim().unwrap(), 2, "down to 90% of the limit");
    assert_eq!(store.bytes(), 90);
    let kept: Vec<bool> = blobs.iter().map(|d| store.contains(d, 30)).collect();
    assert_eq!(kept, [false, false, true, true, true]);

    // Restoring blob 2 makes it the most recently used.
    let checkout = scratch.path().join("checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    let entry =
        OutputFile { path: "out/c".into(), mode: 0o644, digest: blobs[2].clone(), size: 30, ..Default::default() };
    restore(&checkout, &["out".to_owned()], &[entry], &store, &CancellationToken::new()).unwrap();
    let src = scratch.path().join("f5");
    std::fs::write(&src, [b'z'; 30]).unwrap();
    let newest = sha256_of(&[b'z'; 30]);
    store.add_file(&src, &newest, 30, &CancellationToken::new()).unwrap();
    assert_eq!(store.bytes(), 120);
    assert_eq!(store.trim().unwrap(), 1, "blob 3 is now the least recently used");
    let kept: Vec<bool> = blobs.iter().map(|d| store.contains(d, 30)).collect();
    assert_eq!(kept, [false, false, true, false, true]);
    assert!(store.contains(&newest, 30));

    // A store reopened counts what it holds; under the limit nothing goes.
    let reopened = BlobStore::open(&work, 100).unwrap();
    assert_eq!(reopened.bytes(), 90);
    assert_eq!(reopened.trim().unwrap(), 0);
}
