//! A throwaway PostgreSQL cluster for the tests and benches: `initdb` in a temporary
//! directory, the server on a free loopback port, stopped and removed on drop. As root, it
//! runs as `nobody` (PostgreSQL refuses to run as root).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    as_user: Option<&'static str>,
    pub url: String,
}

/// The directory of `initdb` and `pg_ctl`: Debian keeps them per version under
/// /usr/lib/postgresql; elsewhere they are on PATH.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("initdb").exists().then_some(dir)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Cluster {
    /// A cluster for the tests: no fsync (a test never outlives the machine).
    pub fn start() -> Result<Cluster> {
        Cluster::start_with(false)
    }

    /// A cluster with the server's defaults (fsync on): what a bench compares with redb.
    pub fn start_durable() -> Result<Cluster> {
        Cluster::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Cluster> {
        let Some(bin) = bin_dir() else {
            bail!(
                "the tests need PostgreSQL's server programs (initdb, pg_ctl): `apt-get install postgresql` (.ci/run does), or set RBB_TEST_POSTGRES to a server where this user may create databases"
            )
        };
        let as_user = is_root().then_some("nobody");
        let dir = std::env::temp_dir().join(format!("rbb-postgres-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(user) = as_user {
            let ok = Command::new("chown").arg(user).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                bail!("cannot hand {} to {user} for the PostgreSQL cluster", dir.display());
            }
        }
        let port = free_port()?;
        let mut cluster = Cluster { dir, bin, as_user, url: String::new() };
        let data = cluster.dir.join("data");
        cluster.run("initdb", &["-D", path(&data), "-U", "rbb", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        let unsafe_fast = if durable { "" } else { " -c fsync=off -c full_page_writes=off" };
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300{unsafe_fast}",
            cluster.dir.display()
        );
        let log = cluster.dir.join("server.log");
        cluster.run("pg_ctl", &["-D", path(&data), "-l", path(&log), "-o", &options, "-w", "-t", "60", "start"])?;
        cluster.url = format!("postgres://rbb@127.0.0.1:{port}/postgres");
        Ok(cluster)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(program);
        let mut cmd = match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).current_dir(&self.dir).output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            bail!(
                "{program} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if let Err(e) = self.run("pg_ctl", &["-D", path(&data), "-m", "immediate", "-w", "stop"]) {
            eprintln!("stopping the test PostgreSQL cluster: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
