//! `cargo xtask`: the project's automation, as a Rust program so it runs the same everywhere.
//!
//! - `serve`: build and run the demo (today: compile the demo repositories).
//! - `test`: run every test of the workspace (what CI runs).
//! - `bench`: print performance figures with a baseline measured in the same run.
//! - `codegen`: rewrite generated files (the JSON Schemas under schema/).
//!
//! It only orchestrates: it spawns cargo and the project's binaries and holds no product logic.

mod bench;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&root, &args[1..]),
        Some("test") => test(&root, &args[1..]),
        Some("bench") => bench::main(&root, &args[1..]),
        Some("codegen") => codegen(&root),
        _ => {
            eprintln!("usage: cargo xtask <serve|test|bench|codegen> [args]");
            eprintln!("  serve    make the demo repositories and compile them with `rbb compile`");
            eprintln!("  test     run every test (cargo nextest if installed, else cargo test)");
            eprintln!("  bench    print compile and snippet figures (release build)");
            eprintln!("  codegen  rewrite schema/*.schema.json from the Rust types");
            bail!("unknown or missing command");
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Where cargo puts binaries for `profile`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Makes the demo repositories (real git, via the fixture script) under `dir`.
pub(crate) fn make_demo(root: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("repos"))?;
    std::fs::copy(root.join("testdata/demo/rbb.yaml"), dir.join("rbb.yaml"))?;
    for repo in ["lib", "app", "docs"] {
        run(Command::new("sh")
            .arg(root.join("testdata/fixtures/mkrepo.sh"))
            .arg(root.join("testdata/repos").join(repo))
            .arg(dir.join("repos").join(repo))
            .stdout(std::process::Stdio::null()))?;
    }
    Ok(())
}

fn serve(root: &Path, args: &[String]) -> Result<()> {
    let demo = root.join(".rbb-state/demo");
    make_demo(root, &demo)?;
    run(cargo().current_dir(root).args(["build", "--quiet", "-p", "rbb-master", "-p", "rbb-compiler", "--bins"]))?;
    let rbb = target_dir(root).join("debug/rbb");
    println!("demo repositories: {}", demo.join("repos").display());
    println!("$ rbb compile --config {}", demo.join("rbb.yaml").display());
    run(Command::new(&rbb).arg("compile").arg("--config").arg(demo.join("rbb.yaml")).args(args))
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if nextest {
        run(cargo()
            .current_dir(root)
            .args(["nextest", "run", "--workspace", "--no-fail-fast", "--failure-output", "final"])
            .args(args))?;
        // nextest does not run doctests.
        run(cargo().current_dir(root).args(["test", "--workspace", "--doc"]))
    } else {
        run(cargo().current_dir(root).args(["test", "--workspace", "--no-fail-fast"]).args(args))
    }
}

fn codegen(root: &Path) -> Result<()> {
    run(cargo().current_dir(root).args(["build", "--quiet", "-p", "rbb-master", "--bin", "rbb"]))?;
    let rbb = target_dir(root).join("debug/rbb");
    for (file, kind) in [("schema/pipeline.schema.json", "pipeline"), ("schema/config.schema.json", "config")] {
        let out = Command::new(&rbb).args(["schema", kind]).output().context("running rbb schema")?;
        if !out.status.success() {
            bail!("rbb schema {kind} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = root.join(file);
        let old = std::fs::read(&path).unwrap_or_default();
        if old != out.stdout {
            std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {file}");
        } else {
            println!("{file} is up to date");
        }
    }
    Ok(())
}
