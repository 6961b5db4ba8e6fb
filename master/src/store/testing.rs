//! Fresh states on every backend, for tests: one test runs against each (one suite, two
//! backends). PostgreSQL comes from `RBB_TEST_POSTGRES`, the URL of a server where the test
//! user may create databases; `cargo xtask test` starts a throwaway cluster and sets it.

use super::{Location, Migrate, Store, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable naming the test server.
pub const ENV: &str = "RBB_TEST_POSTGRES";

/// A fresh, empty state; it can be opened (and opened again) as often as a test likes.
pub struct Place {
    pub backend: &'static str,
    pub at: Location,
    pub dir: tempfile::TempDir,
}

impl Place {
    pub fn open(&self) -> Store {
        Store::open_at(&self.at, Migrate::Yes).unwrap_or_else(|e| panic!("opening the {} state: {e}", self.backend))
    }

    pub fn try_open(&self) -> Result<Store, StoreError> {
        Store::open_at(&self.at, Migrate::Yes)
    }
}

/// The test server's URL; a test that needs it fails (never skips) without it.
pub fn server_url() -> String {
    std::env::var(ENV).unwrap_or_else(|_| {
        panic!(
            "{ENV} is not set: run the tests with `cargo xtask test`, which starts a throwaway PostgreSQL cluster, or point {ENV} at a server where this user may create databases"
        )
    })
}

/// A new empty database on the test server; answers its URL.
pub fn fresh_database() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = server_url();
    let name = format!(
        "rbb_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
    );
    let admin = super::pg::Pg::connect(&base, None).unwrap_or_else(|e| panic!("{ENV}: {e}"));
    let conn = admin.read_conn().expect("a connection");
    conn.execute_batch(&format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("creating {name}: {e}"));
    with_database(&base, &name)
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A fresh state on each backend: redb, then PostgreSQL.
pub fn places() -> Vec<Place> {
    let redb_dir = tempfile::tempdir().expect("tempdir");
    let redb = Place { backend: "redb", at: Location::File(redb_dir.path().join("state.redb")), dir: redb_dir };
    let pg = Place {
        backend: "postgres",
        at: Location::Postgres { url: fresh_database(), password: None, lease: super::pg::DEFAULT_LEASE },
        dir: tempfile::tempdir().expect("tempdir"),
    };
    vec![redb, pg]
}

/// `#[test]`s that run each named `fn(&Place)` of the enclosing module on every backend.
#[cfg(test)]
macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        /// Each test above, on every backend.
        mod on_each_backend {
            $(
                #[test]
                fn $name() {
                    for place in crate::store::testing::places() {
                        super::$name(&place);
                    }
                }
            )*
        }
    };
}
#[cfg(test)]
pub(crate) use on_each_backend;
