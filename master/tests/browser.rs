//! Browser tests: the real web UI in a real headless Chromium, driven over WebDriver
//! (`chromedriver` + fantoccini), against the real `rbb master` and `rbb-worker` binaries.
//! Needs `chromium` and `chromedriver` on PATH (`.ci/run` installs them); says so loudly
//! when they are missing. Screenshots go to `$CARGO_TARGET_DIR/rbb-artifacts/`.

mod support;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(30);

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

/// Where test artifacts (screenshots) go.
fn artifacts() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let dir = base.join("rbb-artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Saves a screenshot of the page as a test artifact.
async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = artifacts().join(name);
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("save {}: {e}", path.display()));
    eprintln!("screenshot: {}", path.display());
}

/// A `chromedriver` on a free port, in its own process group: dropping it kills the driver
/// and every browser it started.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    fn start(dir: &Path) -> Driver {
        let bin = on_path(&["chromedriver"]).unwrap_or_else(|| {
            panic!("chromedriver is not on PATH: the browser tests need Chromium and its driver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
        });
        // chromedriver picks its port itself and can lose a race for it with another process
        // ("bind() failed: Address already in use"): then it is started again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let log = dir.join(format!("chromedriver-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("chromedriver log");
            let err = out.try_clone().expect("clone log");
            let mut cmd = Command::new(&bin);
            // Port 0: the system picks a free port, which the driver's log then names.
            cmd.arg("--port=0").stdin(Stdio::null()).stdout(out).stderr(err);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
            let mut lost_port = false;
            let addr = wait_for(Duration::from_secs(20), "chromedriver to listen", || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Ok(Some(status)) = child.try_wait() {
                    if attempt < 3 && text.contains("Address already in use") {
                        lost_port = true;
                        return Some(String::new());
                    }
                    panic!("chromedriver exited with {status}: {text}");
                }
                let port: u16 = text
                    .split("started successfully on port ")
                    .nth(1)?
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()?;
                let addr = format!("127.0.0.1:{port}");
                std::net::TcpStream::connect(&addr).ok().map(|_| addr)
            });
            if lost_port {
                continue;
            }
            return Driver { child, url: format!("http://{addr}"), log };
        }
    }

    /// A new headless Chromium session with its own profile under `dir`.
    async fn browser(&self, dir: &Path) -> Client {
        let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"]).unwrap_or_else(|| {
            panic!("chromium is not on PATH: the browser tests need it (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
        });
        let profile = dir.join("chromium-profile");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,900", "--no-first-run", "--no-default-browser-check",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector).capabilities(caps).connect(&self.url).await.unwrap_or_else(|e| {
            panic!(
                "cannot open a Chromium session: {e}\n--- chromedriver log\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the negated pid of the process group this test created.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- chromedriver log ({})\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Runs a script in the page; returns its value.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// What the page shows, for failure messages.
async fn page_state(c: &Client) -> String {
    let url = c.current_url().await.map(|u| u.to_string()).unwrap_or_default();
    let text = c.execute("return document.getElementById('view')?.innerText ?? ''", vec![]).await.unwrap_or_default();
    let text = text.as_str().unwrap_or_default();
    let errors = c.execute("return window.rbbErrors ?? []", vec![]).await.unwrap_or_default();
    let text: String = text.chars().take(3000).collect();
    let log = c
        .execute("return (document.querySelector('pre.log')?.textContent ?? '').slice(-500)", vec![])
        .await
        .unwrap_or_default();
    format!(
        "at {url}; script errors: {errors}; the page says:\n{text}\n--- the log viewer ends with:\n{}",
        log.as_str().unwrap_or_default()
    )
}

/// Polls `f` until it gives `Some`, failing after `timeout` with `what` and the page's state.
async fn until<T, F, Fut>(c: &Client, timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}, {}", page_state(c).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for an element matching `css` and returns it.
async fn element(c: &Client, css: &str) -> fantoccini::elements::Element {
    until(c, T, &format!("`{css}`"), || async { c.find(Locator::Css(css)).await.ok() }).await
}

/// Waits until the script's value is `true`.
async fn until_js(c: &Client, timeout: Duration, what: &str, script: &str) {
    until(c, timeout, what, || async { (js(c, script).await == Value::Bool(true)).then_some(()) }).await
}

fn pipeline(gate: &Path) -> String {
    format!(
        r#"
builders:
  hello:
    description: says hello, then waits for the test to open the gate
    labels: [linux]
    tags: [smoke]
    steps:
      - name: greet
        run: |
          echo "hello from the browser test"
          while [ ! -e '{gate}.1' ]; do sleep 0.05; done
          echo "gate one opened"
          while [ ! -e '{gate}.2' ]; do sleep 0.05; done
          echo "gate two opened"
  after:
    labels: [linux]
    needs: [hello]
    steps:
      - name: done
        run: echo done
"#,
        gate = gate.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_forced_in_the_ui_turns_its_cell_green_live_and_shows_its_log() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    make_repo(&dir.path().join("app"), &pipeline(&gate), &[("README.md", "hi\n")]);
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &["linux"])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    wait_for(T, "worker w1 to connect", || {
        let w = m.get("/api/v2/workers").json();
        w["workers"].as_array()?.iter().any(|w| w["name"] == "w1" && w["connected"] == true).then_some(())
    });
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);

    // The grid: both builders, grouped under their repository; live events connected.
    c.goto(&format!("{base}/")).await.expect("open the UI");
    element(&c, "#grid-wrap[data-loaded] div.chunk[data-repo='app'] a[href='#/builders/app%2Fhello']").await;
    element(&c, "a[href='#/builders/app%2Fafter']").await;
    until_js(&c, T, "live events to connect", "return document.getElementById('live').dataset.state === 'open'").await;
    // Marks this page load: a reload would lose it.
    js(&c, "window.rbbSamePage = true; return null").await;

    // Builder page → force form → the new build's page.
    element(&c, "a[href='#/builders/app%2Fhello']").await.click().await.expect("open the builder");
    element(&c, "#force-link").await.click().await.expect("open the force form");
    let reason = element(&c, "#force-form input[name='reason']").await;
    reason.clear().await.expect("clear");
    reason.send_keys("forced by the browser test").await.expect("type a reason");
    element(&c, "#force-form textarea[name='properties']")
        .await
        .send_keys("who=chromium")
        .await
        .expect("type properties");
    screenshot(&c, "force.png").await;
    element(&c, "#force-submit").await.click().await.expect("submit");
    let id: u64 = until(&c, T, "the new build's page", || async {
        let url = c.current_url().await.ok()?;
        url.fragment()?.strip_prefix("/builds/")?.parse().ok()
    })
    .await;
    let b = m.build(id);
    assert_eq!(b["builder"], "app/hello");
    assert_eq!(b["reason"], "forced by the browser test");

    // The running step's log is followed live.
    until_js(
        &c,
        T,
        "the running step's log",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('hello from the browser test')",
    )
    .await;
    until_js(
        &c,
        T,
        "the build page to show it running",
        "return document.getElementById('view').dataset.state === 'running'",
    )
    .await;
    std::fs::write(gate.with_extension("1"), "open").expect("open gate one");
    until_js(
        &c,
        T,
        "the followed log to grow",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('gate one opened')",
    )
    .await;

    // Back to the grid (no reload): the cell is running; opening the gate turns it green
    // through live events alone.
    element(&c, "a[data-nav='grid']").await.click().await.expect("back to the grid");
    let cell = format!("a[href='#/builds/{id}']");
    element(&c, &format!("td.s-running > {cell}")).await;
    std::fs::write(gate.with_extension("2"), "open").expect("open gate two");
    element(&c, &format!("td.r-SUCCESS > {cell}")).await;
    assert_eq!(js(&c, "return window.rbbSamePage === true").await, Value::Bool(true), "the page was reloaded");
    assert_eq!(js(&c, "return document.getElementById('live').dataset.state").await, "open");

    screenshot(&c, "grid.png").await;
    // No change was recorded for the forced commit: its heading says when it was first seen.
    let head = text_of(&c, ".grid-head th.col").await;
    assert!(
        head.contains(&b["commit"].as_str().expect("commit")[..7]) && head.contains("seen") && head.contains("app"),
        "{head}"
    );

    // The cell links to the build page, which shows the whole log of the finished step.
    element(&c, &cell).await.click().await.expect("open the build from its cell");
    until_js(&c, T, "the finished build page", "return document.getElementById('view').dataset.result === 'SUCCESS'")
        .await;
    until_js(&c, T, "the step's log", "const t = document.querySelector('pre.log')?.textContent ?? ''; return t.includes('hello from the browser test') && t.includes('gate two opened')").await;
    let steps = element(&c, "#build-steps").await.text().await.expect("steps text");
    assert!(steps.contains("greet") && steps.contains("SUCCESS"), "{steps}");
    let why = element(&c, "#build-why").await.text().await.expect("why text");
    assert!(why.contains("forced by the browser test"), "{why}");
    screenshot(&c, "build.png").await;

    // The other pages render from the API.
    element(&c, "a[data-nav='workers']").await.click().await.expect("workers");
    element(&c, "tr[data-worker='w1'].on").await;
    let containers = element(&c, "tr[data-worker='w1'] td.containers").await.text().await.expect("containers text");
    assert_eq!(containers, "none", "a native worker runs no images");
    screenshot(&c, "workers.png").await;
    element(&c, "a[data-nav='plan']").await.click().await.expect("plan");
    element(&c, "svg.dag a.node[data-id='app/after']").await;
    let edges = js(&c, "return document.querySelectorAll('svg.dag path.edge').length").await;
    assert_eq!(edges, 1, "one arrow: app/after needs app/hello");
    screenshot(&c, "plan.png").await;

    // A node of the plan leads to its builder's page, whose history has the build.
    element(&c, "svg.dag a.node[data-id='app/hello']").await.click().await.expect("open a builder from the plan");
    element(&c, &format!("#builder-history a[href='#/builds/{id}']")).await;
    let def = element(&c, "#builder-def").await.text().await.expect("definition");
    assert!(def.contains("greet") && def.contains("smoke") && def.contains("linux"), "{def}");
    screenshot(&c, "builder.png").await;

    c.close().await.expect("close the browser");
    eprintln!("browser test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_log_is_shown_a_page_at_a_time() {
    const BIG: &str = "builders:\n  big:\n    steps:\n      - name: count\n        run: seq 1 400000\n";
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), BIG, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    let id = m.force("app/big");
    let b = m.finished(id, T);
    let size = b["steps"][0]["log_bytes"].as_u64().expect("log size");
    assert!(size > 2_000_000, "the log is {size} bytes");
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    const TEXT: &str = "return document.querySelector('pre.log')?.textContent ?? ''";
    const PAGE: usize = 256 * 1024;

    // A finished log opens at its end.
    c.goto(&format!("http://{}/#/builds/{id}", m.http)).await.expect("open the build");
    until_js(
        &c,
        T,
        "the end of the log",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('\\n400000\\n')",
    )
    .await;
    let tail = js(&c, TEXT).await;
    let tail = tail.as_str().expect("text");
    assert!(tail.len() <= PAGE && !tail.contains("\n200000\n"), "the tail is one page: {} bytes", tail.len());

    // first, next, last move a page at a time.
    element(&c, "button[data-log='first']").await.click().await.expect("first");
    until_js(
        &c,
        T,
        "the first page",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('\\n1\\n2\\n3\\n')",
    )
    .await;
    assert!(js(&c, TEXT).await.as_str().expect("text").len() <= PAGE);
    // Lines are numbered from the first page on: `seq` prints n on line n + (header lines).
    const SHIFT: &str = "const l = [...document.querySelectorAll('pre.log .l[id]')].filter(l => /^\\d+\\n$/.test(l.textContent))[1]; return Number(l.id.slice(1)) - Number(l.textContent)";
    let shift = js(&c, SHIFT).await.as_i64().expect("line number minus value");
    assert!(shift > 0, "the first page is numbered after the header lines: {shift}");
    element(&c, "button[data-log='next']").await.click().await.expect("next");
    until_js(
        &c,
        T,
        "the second page",
        "return document.querySelector('.log-range').textContent.startsWith('256 KiB–512 KiB of ')",
    )
    .await;
    assert_eq!(js(&c, SHIFT).await.as_i64(), Some(shift), "the next page goes on numbering where the first ended");
    element(&c, "button[data-log='last']").await.click().await.expect("last");
    until_js(
        &c,
        T,
        "the last page again",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('\\n400000\\n')",
    )
    .await;

    // No request read more than a page of the log.
    let sizes = js(&c, "return performance.getEntriesByType('resource').filter(e => e.name.includes('/raw')).map(e => e.encodedBodySize)").await;
    let sizes: Vec<u64> = sizes.as_array().expect("sizes").iter().map(|v| v.as_u64().expect("size")).collect();
    assert!(sizes.len() >= 4, "{sizes:?}");
    assert!(sizes.iter().all(|s| *s <= PAGE as u64), "a log request read more than a page: {sizes:?}");
    screenshot(&c, "log.png").await;
    c.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_and_header_lines_are_marked_in_the_log() {
    // Each write is a whole line, so every line holds one stream whatever order the worker
    // reads its two pipes in; the stderr line is coloured by ANSI escapes.
    const STREAMS: &str = "builders:\n  streams:\n    steps:\n      - name: both\n        run: |\n          echo plain-out-1\n          printf '\\033[31mred-err-line\\033[0m\\n' >&2\n          echo plain-out-2\n";
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), STREAMS, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    let id = m.force("app/streams");
    let b = m.finished(id, T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;

    c.goto(&format!("http://{}/#/builds/{id}", m.http)).await.expect("open the build");
    until_js(&c, T, "the log with both streams", "return [...document.querySelectorAll('pre.log .l')].some(l => l.textContent === 'red-err-line\\n') && [...document.querySelectorAll('pre.log .l.s-err')].length > 0").await;
    // How each line of the page is marked: its text, classes, title and whether it is red.
    let lines = js(
        &c,
        "return [...document.querySelectorAll('pre.log .l')].map(l => ({ text: l.textContent, err: l.classList.contains('s-err'), hdr: l.classList.contains('s-hdr'), title: l.title, id: l.id, red: !!l.querySelector('.a-f1') }))",
    )
    .await;
    let lines = lines.as_array().expect("lines");
    let line = |text: &str| {
        lines.iter().find(|l| l["text"] == text).unwrap_or_else(|| panic!("no line {text:?} in {lines:#?}"))
    };
    let err = line("red-err-line\n");
    assert_eq!((&err["err"], &err["hdr"], &err["title"]), (&json!(true), &json!(false), &json!("stderr")), "{err}");
    assert_eq!(err["red"], true, "the ANSI colour of the stderr line is kept: {err}");
    assert!(err["id"].as_str().is_some_and(|i| i.starts_with('L')), "the stderr line keeps its anchor: {err}");
    for out in ["plain-out-1\n", "plain-out-2\n"] {
        let l = line(out);
        assert_eq!((&l["err"], &l["hdr"], &l["title"]), (&json!(false), &json!(false), &json!("")), "{l}");
    }
    // The worker's own lines (the command it runs) are muted, never marked stderr.
    let headers: Vec<&Value> = lines.iter().filter(|l| l["hdr"] == true).collect();
    assert!(
        headers.iter().any(|l| l["text"].as_str().is_some_and(|t| t.starts_with("$ echo plain-out-1"))),
        "{lines:#?}"
    );
    assert!(headers.iter().all(|l| l["err"] == false), "{headers:#?}");
    assert_eq!(lines.iter().filter(|l| l["err"] == true).count(), 1, "{lines:#?}");

    // Search still finds the stderr line, and a line link still leads to it.
    element(&c, "input.log-search").await.send_keys("red-err-line").await.expect("search");
    until_js(&c, T, "the search to mark the stderr line", "return !!document.querySelector('pre.log .l.s-err.hit')")
        .await;
    let n = err["id"].as_str().expect("id")[1..].to_owned();
    c.goto(&format!("http://{}/#/builds/{id}?step=1&line={n}", m.http)).await.expect("open the line");
    until_js(
        &c,
        T,
        "the linked stderr line",
        &format!("const l = document.querySelector('#L{n}.target'); return !!l && l.classList.contains('s-err')"),
    )
    .await;
    screenshot(&c, "log-streams.png").await;
    c.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_rebuild_use_the_api_token_kept_in_the_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    let pipeline = format!(
        "builders:\n  wait:\n    steps:\n      - name: wait\n        run: while [ ! -e '{}' ]; do sleep 0.05; done\n",
        gate.display()
    );
    make_repo(&dir.path().join("app"), &pipeline, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("api_token: s3cret\n");
    std::fs::write(&config, text).expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);

    // Without the token the master refuses, and the form says what to do.
    c.goto(&format!("{base}/#/builders/app%2Fwait/force")).await.expect("open the force form");
    element(&c, "#force-submit").await.click().await.expect("submit");
    let err = element(&c, "#force-error .error").await.text().await.expect("error text");
    assert!(err.contains("API token"), "{err}");
    assert!(builds(&m).is_empty());

    // The refusal opened the header's token box; the token is kept for the tab only.
    until_js(&c, T, "the token box to open", "return document.getElementById('token-box').open").await;
    assert_eq!(text_of(&c, "#token-summary").await, "anonymous · read");
    element(&c, "#token-input").await.send_keys("s3cret").await.expect("type the token");
    element(&c, "#token-form button[type='submit']").await.click().await.expect("save the token");
    assert_eq!(js(&c, "return sessionStorage.getItem('rbb.token')").await, "s3cret");
    assert_eq!(js(&c, "return localStorage.getItem('rbb.token')").await, Value::Null);
    until_js(
        &c,
        T,
        "the header to name the token",
        "return document.getElementById('token-summary').textContent === 'api_token · admin'",
    )
    .await;
    element(&c, "#force-submit").await.click().await.expect("submit again");
    let id: u64 = until(&c, T, "the new build's page", || async {
        let url = c.current_url().await.ok()?;
        url.fragment()?.strip_prefix("/builds/")?.parse().ok()
    })
    .await;

    // Stop the running build from its page.
    until_js(&c, T, "the build to run", "return document.getElementById('view').dataset.state === 'running'").await;
    element(&c, "#btn-stop:not([disabled])").await.click().await.expect("stop");
    let b = m.finished(id, T);
    assert_eq!(b["result"], "CANCELLED", "{b:#}");
    until_js(
        &c,
        T,
        "the page to show it cancelled",
        "return document.getElementById('view').dataset.result === 'CANCELLED'",
    )
    .await;

    // Rebuild it: a new build of the same builder and commit.
    element(&c, "#btn-rebuild").await.click().await.expect("rebuild");
    let again: u64 = until(&c, T, "the rebuild's page", || async {
        let url = c.current_url().await.ok()?;
        url.fragment()?.strip_prefix("/builds/")?.parse().ok().filter(|n| *n != id)
    })
    .await;
    let r = m.build(again);
    assert_eq!((r["builder"].as_str(), r["commit"].as_str()), (b["builder"].as_str(), b["commit"].as_str()));
    std::fs::write(&gate, "open").expect("open the gate");
    assert_eq!(m.finished(again, T)["result"], "SUCCESS");
    until_js(
        &c,
        T,
        "the rebuild's page to show it green",
        "return document.getElementById('view').dataset.result === 'SUCCESS'",
    )
    .await;
    c.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_asks_for_a_token_when_anonymous_reading_is_off_and_hides_what_a_role_cannot_do() {
    use sha2::Digest;
    let hash = |t: &str| {
        format!("sha256:{}", sha2::Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "anonymous: none\ntokens:\n  - {{ name: viewer, role: read, hash: \"{}\" }}\n  - {{ name: operator, role: control, hash: \"{}\" }}\n",
        hash("view-token"),
        hash("operate-token")
    ));
    std::fs::write(&config, text).expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);

    // Nothing is shown without a token: the box opens by itself and says why.
    c.goto(&format!("{base}/#/builders/app%2Fb")).await.expect("open the builder page");
    until_js(&c, T, "the token box to open", "return document.getElementById('token-box').open").await;
    assert_eq!(text_of(&c, "#token-note").await, "This master shows nothing without a token.");
    assert_eq!(text_of(&c, "#token-summary").await, "anonymous · none");

    // A read token: the page loads, the actions it cannot use are hidden.
    element(&c, "#token-input").await.send_keys("view-token").await.expect("type");
    element(&c, "#token-form button[type='submit']").await.click().await.expect("save");
    until_js(
        &c,
        T,
        "the header to name the reader",
        "return document.getElementById('token-summary').textContent === 'viewer · read'",
    )
    .await;
    until_js(
        &c,
        T,
        "the builder page to load",
        "return !!document.querySelector('#builder-def dl, #builder-def pre, #builder-def table')",
    )
    .await;
    let shown = "return [...document.querySelectorAll('#force-link, #btn-cache-reset')].map(e => e.id + '=' + (e.offsetParent !== null)).join(',')";
    assert_eq!(js(&c, shown).await, "btn-cache-reset=false,force-link=false");
    screenshot(&c, "roles-read.png").await;

    // A control token may force, not reset the cache (an admin action).
    element(&c, "#token-summary").await.click().await.expect("open the token box");
    element(&c, "#token-input").await.send_keys("operate-token").await.expect("type");
    element(&c, "#token-form button[type='submit']").await.click().await.expect("save");
    until_js(
        &c,
        T,
        "the header to name the operator",
        "return document.getElementById('token-summary').textContent === 'operator · control'",
    )
    .await;
    until_js(&c, T, "the force link to show", "return document.getElementById('force-link')?.offsetParent !== null")
        .await;
    assert_eq!(js(&c, shown).await, "btn-cache-reset=false,force-link=true");
    assert_eq!(js(&c, "return sessionStorage.getItem('rbb.token')").await, "operate-token");

    // A token the master does not know is said so.
    element(&c, "#token-summary").await.click().await.expect("open the token box");
    element(&c, "#token-input").await.send_keys("nobody").await.expect("type");
    element(&c, "#token-form button[type='submit']").await.click().await.expect("save");
    until_js(
        &c,
        T,
        "the header to refuse the token",
        "return document.getElementById('token-summary').textContent === 'API token ✗'",
    )
    .await;
    assert!(text_of(&c, "#token-note").await.contains("wrong API token"));
    c.close().await.expect("close the browser");
}

/// Serves only the UI (no API) in-process, for pages that need no master.
async fn ui_only() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, rbb_master::ui::router::<()>()).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_of_1000_builders_by_50_commits_renders_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = ui_only().await;
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let mut figures = Vec::new();
    for run in 1..=3 {
        c.goto(&format!("{base}/#/grid?synthetic=1000x50&run={run}")).await.expect("open the synthetic grid");
        let r = until(&c, T, "the synthetic grid to render", || async {
            let v = js(&c, "return window.rbbGridRender ?? null").await;
            (!v.is_null()).then_some(v)
        })
        .await;
        let cells = js(&c, "return document.querySelectorAll('table.grid td > a').length").await;
        assert_eq!(cells, 50_000, "every cell of the synthetic grid is a link to its build");
        let ms = r["ms"].as_f64().expect("ms");
        let paint = r["paintMs"].as_f64().expect("paintMs");
        let phase = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "run {run}: 1000 builders × 50 commits: rendered in {ms:.0} ms (HTML string {:.0} ms, DOM {:.0} ms, layout {:.0} ms), painted after {paint:.0} ms",
            phase("htmlMs"),
            phase("domMs"),
            phase("layoutMs")
        );
        figures.push((ms, paint));
        if run == 1 {
            screenshot(&c, "grid-synthetic.png").await;
        }
    }
    // The columns share the width of the screen, each heading the commit's subject.
    let used = js(&c, "const w = document.getElementById('grid-wrap'); return document.querySelector('.grid-head').offsetWidth / w.clientWidth").await;
    assert!(used.as_f64().expect("ratio") > 0.9, "the grid uses {used} of the width");
    let first = text_of(&c, ".grid-head th.col").await;
    assert!(first.starts_with("Commit number 50"), "{first}");
    // A generous bound: a figure, not a timing test.
    let worst = figures.iter().map(|f| f.0).fold(0.0, f64::max);
    assert!(worst < 5000.0, "rendering 50,000 cells took {worst:.0} ms");

    // The filter re-renders from the same data; a group collapses without re-rendering.
    let filter = element(&c, "#grid-filter").await;
    filter.send_keys("builder-0042").await.expect("type a filter");
    until_js(&c, T, "the filter to apply", "return document.querySelectorAll('tr[data-b]').length === 1").await;
    filter.clear().await.expect("clear");
    filter.send_keys("nightly").await.expect("filter by tag");
    until_js(&c, T, "the tag filter", "return document.querySelectorAll('tr[data-b]').length === 143").await;
    let toggle = element(&c, "button[data-toggle='repo-000']").await;
    toggle.click().await.expect("collapse a repository");
    until_js(
        &c,
        T,
        "repo-000 to collapse",
        "return document.querySelector(\"div.chunk[data-repo='repo-000']\").classList.contains('collapsed')",
    )
    .await;
    js(&c, "localStorage.clear(); return null").await;
    c.close().await.expect("close the browser");
}

/// Text of the first element matching `css` (empty when there is none).
async fn text_of(c: &Client, css: &str) -> String {
    let script = format!("return document.querySelector({css:?})?.textContent ?? ''");
    js(c, &script).await.as_str().unwrap_or_default().to_owned()
}

/// The newest build of `builder` at `commit` (by the API).
fn build_at(m: &Master, builder: &str, commit: &str) -> Option<Value> {
    builds(m).into_iter().find(|b| b["builder"] == builder && b["commit"] == commit)
}

const PAGES: &str = r#"
builders:
  lint:
    labels: [linux]
    steps:
      - name: colours
        run: |
          printf '\033[1;31mred alert\033[0m and \033[32mgreen\033[0m\n'
          seq 1 40
          echo "the needle $((40 + 2))"
  test:
    labels: [linux]
    steps:
      - name: prepare
        run: echo preparing
      - name: check
        run: exit 3
  package:
    labels: [linux]
    needs: [lint, test]
    steps:
      - name: pack
        run: echo packing
  gpu:
    labels: [gpu]
    steps:
      - name: render
        run: echo never runs here
"#;

/// A master and worker that built two commits of `PAGES` (each seen by the poller, so with a
/// change record), then rebuilt lint at the older one; and a browser.
struct Pages {
    m: Master,
    _w: Worker,
    c: Client,
    _driver: Driver,
    base: String,
    older: String,
    newer: String,
    _dir: tempfile::TempDir,
}

async fn pages() -> Pages {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path().join("app");
    make_repo(&app, PAGES, &[]);
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        "repositories:\n  - url: app\n    poll_interval: 200ms\nworkers:\n  - name: w1\n    token: secret\n    labels: [linux]\n    max_steps: 2\n",
    )
    .expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    // The first poll records where the branches are without building: commit after it.
    let mirror = dir.path().join("state/mirrors/app.git");
    wait_for(T, "the master's first poll", || {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&mirror)
            .args(["for-each-ref", "refs/rbb/recorded/"])
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    // Two commits seen by the poller, each built; the gpu builds wait for a worker forever.
    let settled = |commit: &str| {
        wait_for(T, &format!("the builds of {commit} to finish"), || {
            let all: Vec<Value> = builds(&m).into_iter().filter(|b| b["commit"] == commit).collect();
            let linux = all.iter().filter(|b| b["builder"] != "app/gpu").collect::<Vec<_>>();
            (linux.len() == 3 && linux.iter().all(|b| b["state"] == "finished")).then_some(())
        })
    };
    let older = commit(&app, "parser.txt", "parse\n", 10, "Add the parser");
    settled(&older);
    let newer = commit(&app, "parser.txt", "parse in colour\n", 20, "Teach the parser colours");
    settled(&newer);
    // Rebuild lint at the older commit: the newest activity is now on the older commit.
    let old_lint = build_at(&m, "app/lint", &older).expect("lint at the older commit");
    let r = m.post(&format!("/api/v2/builds/{}/rebuild", old_lint["id"]), "");
    assert!(r.status == 200 || r.status == 201, "rebuild: {}", r.text());
    let again = r.json()["build"].as_u64().expect("rebuild id");
    assert_eq!(m.finished(again, T)["result"], "SUCCESS");
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);
    Pages { m, _w: w, c, _driver: driver, base, older, newer, _dir: dir }
}

/// The grid's columns: ordered by commit time, headed by what the commit is, as wide as the screen allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_columns_are_commits_newest_first_with_subject_author_time_and_repo() {
    let p = pages().await;
    let (m, c, base, older, newer) = (&p.m, &p.c, &p.base, &p.older, &p.newer);
    let grid = m.get("/api/v2/grid").json();
    assert_eq!(grid["columns"][0]["commit"], older.as_str(), "the API lists the rebuilt commit first: {grid:#}");
    // The grid: newest commit first whatever was built last, each heading with the commit's
    // subject, author, time and repository; the cells widen into the free width.
    c.goto(&format!("{base}/")).await.expect("open the UI");
    element(c, "#grid-wrap[data-loaded] th.col").await;
    let heads = js(c, "return [...document.querySelectorAll('.grid-head th.col')].map(th => th.innerText)").await;
    let heads: Vec<&str> = heads.as_array().expect("headings").iter().map(|h| h.as_str().expect("text")).collect();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].contains("Teach the parser colours"), "the newest commit comes first: {heads:?}");
    assert!(heads[1].contains("Add the parser"), "{heads:?}");
    for (h, id) in heads.iter().zip([&newer, &older]) {
        assert!(h.contains("rbb fixtures") && h.contains("ago") && h.contains("app") && h.contains(&id[..7]), "{h}");
    }
    let widths = js(c, "return [...document.querySelectorAll('table.grid td')].map(td => td.offsetWidth)").await;
    assert!(widths.as_array().expect("widths").iter().all(|w| w.as_u64().expect("width") > 100), "cells: {widths}");
    screenshot(c, "pages-grid.png").await;

    c.clone().close().await.expect("close the browser");
}

/// The build page: step numbers, needed builds, why a pending build waits, not-found, title, no cache placeholder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_page_numbers_steps_names_needs_says_why_it_waits_and_knows_missing_builds() {
    let p = pages().await;
    let (m, c, base, newer) = (&p.m, &p.c, &p.base, &p.newer);
    // A failed build: steps numbered as in its result line; the title names it.
    let test = build_at(m, "app/test", newer).expect("test build");
    let test_id = test["id"].as_u64().expect("id");
    assert!(test["result_reason"].as_str().expect("reason").starts_with("step 2 (check)"), "{test:#}");
    c.goto(&format!("{base}/#/builds/{test_id}")).await.expect("open the failed build");
    until_js(c, T, "the failed build", "return document.getElementById('view').dataset.result === 'FAILURE'").await;
    let facts = text_of(c, "#build-facts").await;
    assert!(facts.contains("step 2 (check)"), "{facts}");
    let rows = js(c, "return [...document.querySelectorAll('#build-steps tbody tr')].map(tr => [tr.cells[0].innerText, tr.cells[1].innerText])").await;
    assert_eq!(rows, json!([["1", "prepare"], ["2", "check"]]));
    let title = js(c, "return document.title").await;
    assert!(title.as_str().expect("title").contains(&format!("Build {test_id} · app/test")), "{title}");
    // No cache box until the cache reports.
    let why = text_of(c, "#build-why").await;
    assert!(
        !why.to_lowercase().contains("cache")
            && js(c, "return document.querySelector('#build-why textarea') === null").await == true,
        "{why}"
    );

    // The build that needs two others names them, with their results and links.
    let package = build_at(m, "app/package", newer).expect("package build");
    c.goto(&format!("{base}/#/builds/{}", package["id"])).await.expect("open the package build");
    element(c, "#build-needs li[data-needs] .badge").await;
    let needs = js(c, "return [...document.querySelectorAll('#build-needs li')].map(li => [li.querySelector('a').innerText, li.querySelector('a').getAttribute('href'), li.querySelector('.badge')?.innerText ?? ''])").await;
    let mut needs: Vec<Value> = needs.as_array().expect("needs").clone();
    needs.sort_by_key(|n| n[0].as_str().unwrap_or_default().to_owned());
    let lint = build_at(m, "app/lint", newer).expect("lint build");
    assert_eq!(
        needs,
        [
            json!(["app/lint", format!("#/builds/{}", lint["id"]), "SUCCESS"]),
            json!(["app/test", format!("#/builds/{test_id}"), "FAILURE"])
        ]
    );
    screenshot(c, "pages-needs.png").await;

    // A pending build says why it waits, and cannot be rebuilt.
    let gpu = build_at(m, "app/gpu", newer).expect("gpu build");
    assert_eq!(gpu["state"], "pending");
    let waiting = gpu["waiting"].as_str().expect("the API says why it waits").to_owned();
    c.goto(&format!("{base}/#/builds/{}", gpu["id"])).await.expect("open the pending build");
    element(c, "#build-waiting:not([hidden])").await;
    assert_eq!(text_of(c, "#build-waiting").await, format!("Waiting: {waiting}"));
    assert_eq!(js(c, "return document.getElementById('btn-rebuild').disabled").await, true);
    screenshot(c, "pages-pending.png").await;

    // A build the master does not have: a page saying so, nothing else.
    c.goto(&format!("{base}/#/builds/999999")).await.expect("open a missing build");
    until_js(c, T, "the not-found page", "return document.getElementById('view').dataset.state === 'missing'").await;
    let view = text_of(c, "#view").await;
    assert!(view.contains("Build 999999 not found") && !view.contains("Loading"), "{view}");
    let leftovers = js(c, "return ['#btn-stop', '#btn-rebuild', '#build-steps', '#build-log', '#build-facts'].filter(s => document.querySelector(s))").await;
    assert_eq!(leftovers, json!([]));
    assert!(js(c, "return document.title").await.as_str().expect("title").contains("999999 not found"));
    screenshot(c, "pages-missing.png").await;

    c.clone().close().await.expect("close the browser");
}

/// The log viewer: numbered lines with links, ANSI colours, search, download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_viewer_numbers_links_colours_searches_and_downloads() {
    let p = pages().await;
    let (m, c, base, newer) = (&p.m, &p.c, &p.base, &p.newer);
    let lint = build_at(m, "app/lint", newer).expect("lint build");
    // The log: colours rendered, numbered lines that link to themselves, search, download.
    let lint_id = lint["id"].as_u64().expect("id");
    c.goto(&format!("{base}/#/builds/{lint_id}")).await.expect("open the lint build");
    until_js(
        c,
        T,
        "the log",
        "return (document.querySelector('pre.log')?.textContent ?? '').includes('the needle 42')",
    )
    .await;
    assert_eq!(text_of(c, "pre.log span.a-f1.a-bold").await, "red alert");
    assert_eq!(text_of(c, "pre.log span.a-f2").await, "green");
    js(c, "document.querySelector('pre.log span.a-f1').scrollIntoView({ block: 'center' }); return null").await;
    screenshot(c, "pages-log-colours.png").await;
    let raw = text_of(c, "pre.log").await;
    assert!(
        !raw.contains('\u{1b}') && raw.contains("\nred alert and green\n"),
        "escape sequences are not shown: {raw}"
    );
    let line = js(c, "const l = [...document.querySelectorAll('pre.log .l')].find(l => l.textContent === '20\\n'); return l && [l.id, l.querySelector('a.n').getAttribute('href')]").await;
    let anchor = line[0].as_str().expect("id").to_owned();
    let n: u32 = anchor.strip_prefix('L').expect("L<n>").parse().expect("number");
    assert_eq!(line[1], format!("#/builds/{lint_id}?step=1&line={n}"));
    // Opening the link (a fresh page) shows that line marked.
    c.goto(&format!("{base}/#/builds/{lint_id}?step=1&line={n}")).await.expect("open the line's link");
    c.refresh().await.expect("reload");
    element(c, &format!("pre.log #{anchor}.target")).await;
    assert_eq!(text_of(c, "pre.log .l.target").await, "20\n");
    // Clicking another line's number marks that line, without reading the log again.
    js(c, "window.rbbSamePage = true; return null").await;
    element(c, &format!("pre.log #L{} a.n", n + 1)).await.click().await.expect("click a line number");
    element(c, &format!("pre.log #L{}.target", n + 1)).await;
    assert_eq!(text_of(c, "pre.log .l.target").await, "21\n");
    assert_eq!(js(c, "return document.querySelectorAll('pre.log .l.target').length").await, 1);
    assert_eq!(js(c, "return window.rbbSamePage === true").await, true, "the page was reloaded");
    let url = c.current_url().await.expect("url");
    assert_eq!(url.fragment(), Some(format!("/builds/{lint_id}?step=1&line={}", n + 1).as_str()));
    let search = element(c, "input.log-search").await;
    search.send_keys("NEEDLE 42").await.expect("search");
    until_js(c, T, "the search to mark its line", "return document.querySelectorAll('pre.log .l.hit').length === 1")
        .await;
    assert_eq!(text_of(c, "pre.log .l.current").await, "the needle 42\n");
    assert_eq!(text_of(c, ".log-hits").await, "1 of 1 line");
    let download = js(
        c,
        "const a = document.querySelector('a.download'); return [a.getAttribute('download'), a.getAttribute('href')]",
    )
    .await;
    assert_eq!(download[0], "build-".to_owned() + &lint_id.to_string() + "-step-1-colours.log");
    let got = js(c, "return fetch(document.querySelector('a.download').href).then(r => r.text())").await;
    assert!(got.as_str().expect("log").contains("the needle 42"), "{got}");
    screenshot(c, "pages-log.png").await;

    c.clone().close().await.expect("close the browser");
}

/// The builder page: the last builds as a chart, success rate, median duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_page_charts_its_last_builds() {
    let p = pages().await;
    let (c, base) = (&p.c, &p.base);
    // The builder page: the last builds as a chart, success rate, median duration.
    c.goto(&format!("{base}/#/builders/app%2Flint")).await.expect("open the builder");
    element(c, "#builder-trend svg.chart").await;
    assert_eq!(js(c, "return document.querySelectorAll('#builder-trend svg.chart rect.bar').length").await, 3);
    assert_eq!(text_of(c, "#builder-rate b").await, "100%");
    assert!(!text_of(c, "#builder-median b").await.is_empty());
    c.goto(&format!("{base}/#/builders/app%2Ftest")).await.expect("open the failing builder");
    element(c, "#builder-trend svg.chart rect.bar.r-FAILURE").await;
    assert_eq!(text_of(c, "#builder-rate b").await, "0%");
    screenshot(c, "pages-builder.png").await;
    c.clone().close().await.expect("close the browser");
}

/// The step cache in the UI: a reused step says where from, a step that ran says why, and
/// the builder page counts reused steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_step_links_its_source_and_a_run_step_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  cached:\n    labels: [linux]\n    steps:\n      - name: make\n        run: cat src/in.txt > made.txt\n        inputs: [src]\n        outputs: [made.txt]\n      - name: deploy\n        run: cat made.txt\n        cache: false\n",
        &[("src/in.txt", "input\n")],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &["linux"])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    let first = m.finished(m.force("app/cached"), T);
    assert_eq!(first["result"], "SUCCESS", "{first:#}");
    let second = m.finished(m.force("app/cached"), T);
    assert_eq!(second["steps"][0]["result"], "CACHED", "{second:#}");
    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);

    c.goto(&format!("{base}/#/builds/{}?step=1", second["id"])).await.expect("open the second build");
    element(&c, "#step-cache [data-cache='hit']").await;
    let hit = text_of(&c, "#step-cache [data-cache='hit']").await;
    assert!(hit.contains("Reused") && hit.contains(&format!("build {}", first["id"])), "{hit}");
    element(&c, &format!("#step-cache a[href='#/builds/{}?step=1']", first["id"])).await;
    element(&c, "#build-steps .badge.r-CACHED").await;
    screenshot(&c, "cache-hit.png").await;

    c.goto(&format!("{base}/#/builds/{}?step=1", first["id"])).await.expect("open the first build");
    element(&c, "#step-cache [data-cache='miss']").await;
    let miss = text_of(&c, "#step-cache [data-cache='miss']").await;
    assert!(miss.contains("no earlier successful execution"), "{miss}");
    c.goto(&format!("{base}/#/builds/{}?step=2", first["id"])).await.expect("open the uncached step");
    let disabled = text_of(&c, "#step-cache [data-cache='disabled']").await;
    assert!(disabled.contains("`cache: false`"), "{disabled}");

    c.goto(&format!("{base}/#/builders/app%2Fcached")).await.expect("open the builder");
    until_js(
        &c,
        T,
        "the builder's cache figure",
        "const e = document.querySelector('#builder-cache span'); return !!e && e.textContent.includes('1 of 2')",
    )
    .await;
    assert_eq!(text_of(&c, "#builder-cache b").await, "50%");
    c.clone().close().await.expect("close the browser");
}

/// A repository whose forge is unreachable (its URL a closed loopback port) and one whose
/// source goes away after it was mirrored: the grid's group header of the latter shows a red
/// marker with its fetch error, and the repositories page shows both errors with the last
/// fetch and the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_errors_of_repositories_show_on_the_grid_and_the_repositories_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    // A port nothing listens on: bound by the system, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    poll_interval: 1s\n  - url: http://127.0.0.1:{closed}/down.git\n    name: down\n    poll_interval: 1s\nworkers:\n  - name: w1\n    token: t\n"
        ),
    )
    .expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let health = |name: &str| -> Option<Value> {
        let r = m.get("/api/v2/repositories").json();
        r["repositories"].as_array()?.iter().find(|x| x["name"] == name).cloned()
    };
    let down =
        wait_for(T, "the unreachable repository's fetch error", || health("down").filter(|h| !h["error"].is_null()));
    let down_error = down["error"].as_str().expect("error").to_owned();
    assert!(down_error.contains(&format!("127.0.0.1:{closed}")), "{down}");
    // app was mirrored; now its source goes away and its next polls fail.
    wait_for(T, "app's first fetch", || health("app").filter(|h| !h["last_success"].is_null()));
    std::fs::rename(dir.path().join("app"), dir.path().join("app-gone")).expect("move app away");
    let app = wait_for(T, "app's fetch error", || health("app").filter(|h| !h["error"].is_null()));
    let app_error = app["error"].as_str().expect("error").to_owned();
    assert!(app_error.starts_with("cannot fetch <path>"), "{app}");
    let state_dir = dir.path().join("state").display().to_string();
    assert!(app_error.contains("<path>") && !app_error.contains(&state_dir), "no server path is shown: {app}");

    let driver = Driver::start(dir.path());
    let c = driver.browser(dir.path()).await;
    let base = format!("http://{}", m.http);
    c.goto(&format!("{base}/")).await.expect("open the UI");
    let marker = element(&c, "div.chunk[data-repo='app'] tr.group a.fetch-err[data-fetch-error='app']").await;
    let text = marker.text().await.expect("marker text");
    assert!(text.starts_with("fetch failing:"), "{text}");
    let title = marker.attr("title").await.expect("title").unwrap_or_default();
    // The tip is the whole error (its wording may vary between polls: which step of the
    // fetch failed).
    assert!(title.starts_with("cannot fetch <path>") && text.contains("cannot fetch"), "{title}");
    let colour = js(&c, "return getComputedStyle(document.querySelector('a.fetch-err')).backgroundColor").await;
    assert_eq!(colour, "rgb(224, 49, 49)", "the marker is red (--FAILURE)");
    screenshot(&c, "grid-fetch-error.png").await;

    // The marker leads to the repositories page (also in the nav).
    marker.click().await.expect("open the repositories page");
    element(&c, "#repos[data-loaded] tr[data-repo='down'].failing").await;
    let row = text_of(&c, "tr[data-repo='down']").await;
    assert!(row.contains(&format!("127.0.0.1:{closed}")) && !row.contains("not yet"), "{row}");
    assert!(row.contains("never"), "no fetch of it ever succeeded: {row}");
    let cell = text_of(&c, "tr[data-repo='down'] td.fetch-error .err-text").await;
    // The same error as the API's (curl's wording carries a time that may vary by a ms).
    let stable = down_error.split(" after ").next().unwrap_or_default().to_owned();
    assert!(cell.starts_with(&stable) && cell.contains("Couldn't connect"), "{cell} / {down_error}");
    let next = text_of(&c, "tr[data-repo='down'] td:last-child").await;
    assert!(next == "now" || next.starts_with("in "), "the next try: {next}");
    element(&c, "tr[data-repo='app'].failing").await;
    assert_eq!(
        js(&c, "return document.querySelector(\"a[data-nav='repos']\").classList.contains('active')").await,
        true
    );
    let count = text_of(&c, "#repos-count").await;
    assert_eq!(count, "2 watched, 2 failing to fetch");
    screenshot(&c, "repositories.png").await;

    // The source comes back: the next poll clears the marker without a reload.
    std::fs::rename(dir.path().join("app-gone"), dir.path().join("app")).expect("move app back");
    element(&c, "a[data-nav='grid']").await.click().await.expect("back to the grid");
    element(&c, "div.chunk[data-repo='app'] tr.group").await;
    until_js(&c, T, "the marker to go", "return !document.querySelector('a.fetch-err[data-fetch-error=\"app\"]') && !!document.querySelector('#grid-wrap[data-loaded]')").await;
    assert_eq!(js(&c, "return window.rbbErrors.length").await, 0, "{}", page_state(&c).await);
    c.clone().close().await.expect("close the browser");
}
