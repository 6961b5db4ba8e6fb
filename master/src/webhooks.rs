//! Forge webhooks: checks that a request really comes from the forge (GitHub, GitLab,
//! Gitea/Forgejo) and turns the forge's payload into rbb's own [`Event`].
//!
//! Pure: header values and body bytes in, a verdict or an [`Event`] out. It must not do
//! I/O, know axum types, or decide anything about builds — finding the configured
//! repository ([`RepoRef::matches`] helps) and creating change or build requests is the
//! caller's job. The forges' JSON shapes are private wire types here; nothing outside this
//! module sees them.
//!
//! Forges truncate the commit lists they send (GitLab keeps the last 20, Gitea a
//! configurable few), so [`Push::commits`] is a hint for messages and changed files, never
//! the full range `before..after`.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The forge that sent a webhook, from the last segment of the endpoint's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Forge {
    GitHub,
    GitLab,
    /// Gitea and Forgejo (which sends both `X-Forgejo-*` and `X-Gitea-*` headers).
    Gitea,
}

impl Forge {
    /// `"github" | "gitlab" | "gitea" | "forgejo"` (ASCII case-insensitive).
    pub fn from_path(segment: &str) -> Option<Forge> {
        match segment.to_ascii_lowercase().as_str() {
            "github" => Some(Forge::GitHub),
            "gitlab" => Some(Forge::GitLab),
            "gitea" | "forgejo" => Some(Forge::Gitea),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::GitLab => "gitlab",
            Forge::Gitea => "gitea",
        }
    }
}

impl std::fmt::Display for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A header lookup over name/value pairs, matching names ASCII case-insensitively — for
/// callers (and tests) that do not have a case-insensitive map such as axum's `HeaderMap`.
pub fn header_lookup(pairs: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
    move |name| pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
}

// ------------------------------------------------------------------------------------------
// Authenticity
// ------------------------------------------------------------------------------------------

const GITHUB_SIGNATURE: &str = "X-Hub-Signature-256";
const GITEA_SIGNATURE: &str = "X-Gitea-Signature";
const FORGEJO_SIGNATURE: &str = "X-Forgejo-Signature";
const GITLAB_TOKEN: &str = "X-Gitlab-Token";

/// Why a webhook request was not accepted as coming from the forge. The caller answers
/// `Missing` with 401 and the others with 403. Messages never echo the header's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {header} header: set the same secret on the forge's webhook")]
    Missing { header: &'static str },
    #[error("malformed {header} header: {why}")]
    Malformed { header: &'static str, why: String },
    #[error("{header} does not match: the request was not signed with the configured secret")]
    Mismatch { header: &'static str },
}

/// Checks the request is from the forge, with constant-time comparisons:
/// - GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`;
/// - Gitea/Forgejo: `X-Forgejo-Signature` or else `X-Gitea-Signature`:
///   `<hex HMAC-SHA256(secret, body)>`, no prefix;
/// - GitLab: `X-Gitlab-Token: <secret>`.
///
/// `header` looks a header up by name and should be case-insensitive; it is also asked
/// the lower-case name, so a lower-case-keyed map works too. An empty header value counts
/// as missing (Gitea sends an empty signature when its webhook has no secret).
pub fn verify(
    forge: Forge,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    secret: &str,
) -> Result<(), VerifyError> {
    match forge {
        Forge::GitHub => {
            let name = GITHUB_SIGNATURE;
            let value = header_value(&header, name).ok_or(VerifyError::Missing { header: name })?;
            let Some(hex) = value.strip_prefix("sha256=") else {
                return Err(VerifyError::Malformed {
                    header: name,
                    why: "expected `sha256=` followed by 64 hex digits".into(),
                });
            };
            check_hmac(name, hex, body, secret)
        }
        Forge::Gitea => {
            let (name, value) = [FORGEJO_SIGNATURE, GITEA_SIGNATURE]
                .into_iter()
                .find_map(|name| header_value(&header, name).map(|value| (name, value)))
                .ok_or(VerifyError::Missing { header: GITEA_SIGNATURE })?;
            check_hmac(name, &value, body, secret)
        }
        Forge::GitLab => {
            let name = GITLAB_TOKEN;
            let value = header_value(&header, name).ok_or(VerifyError::Missing { header: name })?;
            if same_secret(&value, secret) { Ok(()) } else { Err(VerifyError::Mismatch { header: name }) }
        }
    }
}

/// `header(name)`, else `header(lowercase name)`, trimmed; `None` when absent or empty.
fn header_value(header: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    header(name)
        .or_else(|| header(&name.to_ascii_lowercase()))
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

fn check_hmac(header: &'static str, hex: &str, body: &[u8], secret: &str) -> Result<(), VerifyError> {
    let expected = decode_sha256_hex(hex).map_err(|why| VerifyError::Malformed { header, why })?;
    // HMAC takes keys of any length, so this never fails; failing closed all the same.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| VerifyError::Mismatch { header })?;
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| VerifyError::Mismatch { header })
}

fn decode_sha256_hex(hex: &str) -> Result<[u8; 32], String> {
    if hex.len() != 64 {
        return Err(format!("expected 64 hex digits, got {} characters", hex.chars().count()));
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        let digit = |at: usize| {
            char::from(pair[at]).to_digit(16).ok_or_else(|| format!("not a hex digit at position {}", 2 * i + at + 1))
        };
        // Both digits are < 16, so the byte cannot overflow.
        out[i] = u8::try_from(digit(0)? * 16 + digit(1)?).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Compares MACs of the two strings rather than the strings: constant time (`CtOutput`'s
/// `==` is), and the secret's length does not leak either.
fn same_secret(given: &str, secret: &str) -> bool {
    let mac = |text: &str| {
        HmacSha256::new_from_slice(secret.as_bytes()).map(|mut mac| {
            mac.update(text.as_bytes());
            mac.finalize()
        })
    };
    match (mac(given), mac(secret)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

/// What a webhook asks rbb to consider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(Push),
    PullRequest(PullRequest),
    /// A ping or an event rbb does not act on (issue comments, tag creation events, PR
    /// "labeled", pushes to refs that are neither branches nor tags...): answered 200 and
    /// ignored. `kind` is the forge's event name; `why` says why it is ignored.
    Ignored {
        kind: String,
        why: String,
    },
}

/// Commits pushed to a branch or a tag, or a branch or tag created or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub repo: RepoRef,
    /// From `refs/heads/X`; `None` for tags.
    pub branch: Option<String>,
    /// From `refs/tags/X`; `None` for branches.
    pub tag: Option<String>,
    /// `None` when all zeros (a new branch or tag).
    pub before: Option<String>,
    /// The commit to build; `None` when all zeros (a deleted branch or tag). For GitLab,
    /// `checkout_sha` (the commit, also for annotated tags), else `after`.
    pub after: Option<String>,
    /// As listed in the payload, oldest first (Gitea's newest-first list is reversed).
    pub commits: Vec<PushedCommit>,
    pub pusher: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedCommit {
    pub id: String,
    pub message: String,
    pub author: String,
    pub email: String,
    pub timestamp: Option<String>,
    /// Added, then modified, then removed paths.
    pub files: Vec<String>,
}

/// A pull request (GitLab: merge request) opened, updated with new commits, reopened or
/// closed. Other actions are [`Event::Ignored`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// The base (target) repository.
    pub repo: RepoRef,
    /// Normalised: `opened | synchronize | reopened | closed` (merged counts as closed).
    pub action: String,
    /// GitHub/Gitea `number`, GitLab `iid`.
    pub number: u64,
    pub title: String,
    pub target_branch: String,
    pub source_branch: String,
    pub head_sha: String,
    /// Clone URL of the source repository (a fork, or the base repository itself); `None`
    /// when the forge does not say (e.g. a deleted fork).
    pub head_repo_url: Option<String>,
    /// GitHub/Gitea: the pull request's author; GitLab: the user who triggered the event.
    pub author: Option<String>,
}

impl PullRequest {
    /// Whether the head lives in another repository than the base: a fork, or a head whose
    /// repository the forge does not name (a deleted fork). Such builds get no secrets.
    pub fn from_fork(&self) -> bool {
        let Some(head) = &self.head_repo_url else { return true };
        let head_key = remote_key(head);
        !self.repo.urls.iter().any(|base| match (&head_key, remote_key(base)) {
            (Some(h), Some(b)) => *h == b,
            _ => base.trim() == head.trim(),
        })
    }
}

/// The repository an event is about, as the forge names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    /// `owner/name`, or GitLab's `path_with_namespace` (`group/subgroup/name`).
    pub full_name: String,
    /// The last segment of `full_name` (GitLab: the project's path, not its display name).
    pub name: String,
    /// Clone, SSH and web URLs found in the payload, without duplicates.
    pub urls: Vec<String>,
}

impl RepoRef {
    /// Whether a repository configured on the master as `configured_url` (a URL, an scp-like
    /// `user@host:path`, a local path or a `file://` URL) with name `configured_name` is this
    /// repository.
    ///
    /// A remote URL matches when it equals one of [`RepoRef::urls`] after normalising both
    /// (scheme, `user@`, port, trailing `.git` and `/` stripped, case folded); no fallback,
    /// so `github.com/other/app` never matches `acme/app`. A local path or `file://` URL
    /// cannot be compared with the forge's URLs, so it matches when its last path component
    /// (without `.git`) or `configured_name` equals [`RepoRef::name`], ASCII
    /// case-insensitively.
    pub fn matches(&self, configured_url: &str, configured_name: &str) -> bool {
        let configured_url = configured_url.trim();
        match remote_key(configured_url) {
            Some(key) => self.urls.iter().filter_map(|url| remote_key(url)).any(|k| k == key),
            None => {
                let last = local_last_component(configured_url);
                [last, configured_name.trim()].iter().any(|n| !n.is_empty() && n.eq_ignore_ascii_case(&self.name))
            }
        }
    }
}

/// `host/path` for a remote URL, normalised for comparison; `None` for a local path or a
/// `file://` URL.
fn remote_key(url: &str) -> Option<String> {
    let url = url.trim();
    let rest = if let Some((scheme, rest)) = url.split_once("://") {
        if scheme.eq_ignore_ascii_case("file") || scheme.is_empty() {
            return None;
        }
        rest.to_owned()
    } else {
        // scp-like `[user@]host:path`: a colon before any slash, and not a drive letter.
        let (host, path) = url.split_once(':')?;
        if host.is_empty() || host.contains('/') || host.contains('\\') || host.len() == 1 {
            return None;
        }
        format!("{host}/{path}")
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => host_port,
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path).trim_end_matches('/');
    if host.is_empty() {
        return None;
    }
    Some(format!("{host}/{path}").to_lowercase())
}

fn local_last_component(path: &str) -> &str {
    let path = path.strip_prefix("file://").unwrap_or(path);
    let path = path.trim_end_matches(['/', '\\']);
    let path = path.strip_suffix("/.git").unwrap_or(path);
    let last = path.rsplit(['/', '\\']).next().unwrap_or(path);
    last.strip_suffix(".git").unwrap_or(last)
}

/// Why a webhook's event could not be read. The caller answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("missing {header} header: cannot tell which event this is")]
    MissingEventHeader { header: &'static str },
    #[error("the payload is not the JSON the forge documents: {why}")]
    Json { why: String },
    #[error("the payload has no `{field}`")]
    MissingField { field: &'static str },
}

const GITHUB_EVENT: &str = "X-GitHub-Event";
const GITLAB_EVENT: &str = "X-Gitlab-Event";
const GITEA_EVENT: &str = "X-Gitea-Event";
const FORGEJO_EVENT: &str = "X-Forgejo-Event";

/// Reads the event named by the forge's event header — `X-GitHub-Event` (`push`,
/// `pull_request`, `ping`...), `X-Gitlab-Event` (`Push Hook`, `Tag Push Hook`,
/// `Merge Request Hook`...), `X-Forgejo-Event` or else `X-Gitea-Event` (`push`,
/// `pull_request`, `create`...) — from the body. The body is only read for events rbb acts
/// on; any other event is [`Event::Ignored`] whatever its body. Never panics.
pub fn parse(forge: Forge, header: impl Fn(&str) -> Option<String>, body: &[u8]) -> Result<Event, ParseError> {
    let names: &[&'static str] = match forge {
        Forge::GitHub => &[GITHUB_EVENT],
        Forge::GitLab => &[GITLAB_EVENT],
        Forge::Gitea => &[FORGEJO_EVENT, GITEA_EVENT],
    };
    let kind = names
        .iter()
        .find_map(|name| header_value(&header, name))
        .ok_or(ParseError::MissingEventHeader { header: names[names.len() - 1] })?;
    match (forge, kind.as_str()) {
        (Forge::GitHub | Forge::Gitea, "push") => github_like_push(json(body)?),
        (Forge::GitHub | Forge::Gitea, "pull_request") => github_like_pr(forge, json(body)?),
        (Forge::GitHub, "ping") => Ok(ignored(&kind, "the forge is checking the endpoint")),
        (Forge::GitLab, "Push Hook" | "Tag Push Hook") => gitlab_push(json(body)?),
        (Forge::GitLab, "Merge Request Hook") => gitlab_mr(json(body)?),
        _ => Ok(ignored(&kind, "rbb does not act on this event")),
    }
}

fn ignored(kind: &str, why: &str) -> Event {
    Event::Ignored { kind: kind.to_owned(), why: why.to_owned() }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    if body.starts_with(b"payload=") {
        return Err(ParseError::Json {
            why: "the body is form-encoded; set the webhook's content type to application/json".into(),
        });
    }
    serde_json::from_slice(body).map_err(|e| ParseError::Json { why: e.to_string() })
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, ParseError> {
    value.ok_or(ParseError::MissingField { field })
}

fn required_str(value: Option<String>, field: &'static str) -> Result<String, ParseError> {
    required(value.filter(|v| !v.is_empty()), field)
}

/// `None` for an absent, empty or all-zeros object id.
fn object_id(sha: Option<String>) -> Option<String> {
    sha.filter(|s| !s.is_empty() && !s.bytes().all(|b| b == b'0'))
}

fn last_segment(full_name: &str) -> String {
    full_name.rsplit('/').next().unwrap_or(full_name).to_owned()
}

fn repo_ref(full_name: String, name: Option<String>, urls: Vec<Option<String>>) -> RepoRef {
    let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| last_segment(&full_name));
    let mut unique: Vec<String> = Vec::new();
    for url in urls.into_iter().flatten() {
        if !url.is_empty() && !unique.contains(&url) {
            unique.push(url);
        }
    }
    RepoRef { full_name, name, urls: unique }
}

/// Branch push, tag push, or [`Event::Ignored`] for other refs.
fn push_event(
    kind: &str,
    git_ref: String,
    repo: RepoRef,
    before: Option<String>,
    after: Option<String>,
    mut commits: Vec<PushedCommit>,
    pusher: Option<String>,
) -> Event {
    let (branch, tag) = if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        (Some(branch.to_owned()), None)
    } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        (None, Some(tag.to_owned()))
    } else {
        return ignored(kind, &format!("{git_ref} is neither a branch nor a tag"));
    };
    // Oldest first: if the pushed head is listed first (Gitea), the list is newest first.
    if let (Some(first), Some(last), Some(after)) = (commits.first(), commits.last(), &after)
        && first.id == *after
        && last.id != *after
    {
        commits.reverse();
    }
    Event::Push(Push { repo, branch, tag, before, after, commits, pusher })
}

// --- wire types shared by the three forges -----------------------------------------------

/// A pushed commit as GitHub, GitLab and Gitea all list it. Go sends `null` for empty
/// file lists, hence the `Option`s.
#[derive(Deserialize)]
struct WireCommit {
    id: Option<String>,
    message: Option<String>,
    timestamp: Option<String>,
    author: Option<WirePerson>,
    added: Option<Vec<String>>,
    modified: Option<Vec<String>>,
    removed: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct WirePerson {
    name: Option<String>,
    email: Option<String>,
}

fn commits(wire: Option<Vec<WireCommit>>) -> Result<Vec<PushedCommit>, ParseError> {
    wire.unwrap_or_default()
        .into_iter()
        .map(|c| {
            let (author, email) =
                c.author.map(|a| (a.name.unwrap_or_default(), a.email.unwrap_or_default())).unwrap_or_default();
            let files = [c.added, c.modified, c.removed].into_iter().flatten().flatten().collect();
            Ok(PushedCommit {
                id: required_str(c.id, "commits[].id")?,
                message: c.message.unwrap_or_default(),
                author,
                email,
                timestamp: c.timestamp.filter(|t| !t.is_empty()),
                files,
            })
        })
        .collect()
}

// --- GitHub and Gitea ---------------------------------------------------------------------

#[derive(Deserialize)]
struct HubRepo {
    full_name: Option<String>,
    name: Option<String>,
    clone_url: Option<String>,
    ssh_url: Option<String>,
    html_url: Option<String>,
    git_url: Option<String>,
}

impl HubRepo {
    fn into_ref(self, field: &'static str) -> Result<RepoRef, ParseError> {
        let full_name = required_str(self.full_name, field)?;
        Ok(repo_ref(full_name, self.name, vec![self.clone_url, self.ssh_url, self.html_url, self.git_url]))
    }
}

/// GitHub's `pusher` has `name`; Gitea's is a user with `login` and `username`.
#[derive(Deserialize)]
struct HubUser {
    login: Option<String>,
    username: Option<String>,
    name: Option<String>,
}

impl HubUser {
    fn handle(self) -> Option<String> {
        [self.login, self.username, self.name].into_iter().flatten().find(|s| !s.is_empty())
    }
}

#[derive(Deserialize)]
struct HubPush {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    repository: Option<HubRepo>,
    pusher: Option<HubUser>,
    commits: Option<Vec<WireCommit>>,
}

fn github_like_push(p: HubPush) -> Result<Event, ParseError> {
    let git_ref = required_str(p.git_ref, "ref")?;
    let repo = required(p.repository, "repository")?.into_ref("repository.full_name")?;
    let after = required_str(p.after, "after")?;
    let commits = commits(p.commits)?;
    Ok(push_event(
        "push",
        git_ref,
        repo,
        object_id(p.before),
        object_id(Some(after)),
        commits,
        p.pusher.and_then(HubUser::handle),
    ))
}

#[derive(Deserialize)]
struct HubPrPayload {
    action: Option<String>,
    number: Option<u64>,
    pull_request: Option<HubPr>,
    repository: Option<HubRepo>,
}

#[derive(Deserialize)]
struct HubPr {
    number: Option<u64>,
    title: Option<String>,
    user: Option<HubUser>,
    head: Option<HubBranch>,
    base: Option<HubBranch>,
}

#[derive(Deserialize)]
struct HubBranch {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    repo: Option<HubRepo>,
}

fn github_like_pr(forge: Forge, p: HubPrPayload) -> Result<Event, ParseError> {
    let raw_action = required_str(p.action, "action")?;
    let action = match (forge, raw_action.as_str()) {
        (_, "opened" | "reopened" | "closed") => raw_action.clone(),
        (Forge::GitHub, "synchronize") | (Forge::Gitea, "synchronized") => "synchronize".into(),
        _ => {
            return Ok(ignored("pull_request", &format!("action `{raw_action}` does not change the code to build")));
        }
    };
    let pr = required(p.pull_request, "pull_request")?;
    let head = required(pr.head, "pull_request.head")?;
    let base = required(pr.base, "pull_request.base")?;
    Ok(Event::PullRequest(PullRequest {
        repo: required(p.repository, "repository")?.into_ref("repository.full_name")?,
        action,
        number: required(p.number.or(pr.number), "number")?,
        title: pr.title.unwrap_or_default(),
        target_branch: required_str(base.git_ref, "pull_request.base.ref")?,
        source_branch: required_str(head.git_ref, "pull_request.head.ref")?,
        head_sha: required_str(head.sha, "pull_request.head.sha")?,
        head_repo_url: head.repo.and_then(|r| r.clone_url).filter(|u| !u.is_empty()),
        author: pr.user.and_then(HubUser::handle),
    }))
}

// --- GitLab -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct LabProject {
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
    git_ssh_url: Option<String>,
    web_url: Option<String>,
    http_url: Option<String>,
    ssh_url: Option<String>,
}

impl LabProject {
    fn into_ref(self, field: &'static str) -> Result<RepoRef, ParseError> {
        let full_name = required_str(self.path_with_namespace, field)?;
        Ok(repo_ref(
            full_name,
            None,
            vec![self.git_http_url, self.git_ssh_url, self.web_url, self.http_url, self.ssh_url],
        ))
    }
}

#[derive(Deserialize)]
struct LabPush {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    checkout_sha: Option<String>,
    user_username: Option<String>,
    user_name: Option<String>,
    project: Option<LabProject>,
    commits: Option<Vec<WireCommit>>,
}

fn gitlab_push(p: LabPush) -> Result<Event, ParseError> {
    let git_ref = required_str(p.git_ref, "ref")?;
    let repo = required(p.project, "project")?.into_ref("project.path_with_namespace")?;
    let after = required_str(p.after, "after")?;
    // `checkout_sha` is the commit (also for annotated tags, where `after` is the tag
    // object); it is null when the ref was deleted.
    let after = object_id(p.checkout_sha).or_else(|| object_id(Some(after)));
    let pusher = [p.user_username, p.user_name].into_iter().flatten().find(|s| !s.is_empty());
    Ok(push_event("Push Hook", git_ref, repo, object_id(p.before), after, commits(p.commits)?, pusher))
}

#[derive(Deserialize)]
struct LabMrPayload {
    user: Option<LabUser>,
    project: Option<LabProject>,
    object_attributes: Option<LabMr>,
}

#[derive(Deserialize)]
struct LabUser {
    username: Option<String>,
}

#[derive(Deserialize)]
struct LabMr {
    iid: Option<u64>,
    title: Option<String>,
    action: Option<String>,
    /// Present on `update` when new commits were pushed to the source branch.
    oldrev: Option<String>,
    source_branch: Option<String>,
    target_branch: Option<String>,
    last_commit: Option<LabLastCommit>,
    source: Option<LabProject>,
}

#[derive(Deserialize)]
struct LabLastCommit {
    id: Option<String>,
}

fn gitlab_mr(p: LabMrPayload) -> Result<Event, ParseError> {
    let mr = required(p.object_attributes, "object_attributes")?;
    let raw_action = required_str(mr.action, "object_attributes.action")?;
    let action = match raw_action.as_str() {
        "open" => "opened",
        "reopen" => "reopened",
        "close" | "merge" => "closed",
        "update" if mr.oldrev.as_deref().is_some_and(|r| !r.is_empty()) => "synchronize",
        _ => {
            return Ok(ignored(
                "Merge Request Hook",
                &format!("action `{raw_action}` does not change the code to build"),
            ));
        }
    };
    let last_commit = required(mr.last_commit, "object_attributes.last_commit")?;
    Ok(Event::PullRequest(PullRequest {
        repo: required(p.project, "project")?.into_ref("project.path_with_namespace")?,
        action: action.to_owned(),
        number: required(mr.iid, "object_attributes.iid")?,
        title: mr.title.unwrap_or_default(),
        target_branch: required_str(mr.target_branch, "object_attributes.target_branch")?,
        source_branch: required_str(mr.source_branch, "object_attributes.source_branch")?,
        head_sha: required_str(last_commit.id, "object_attributes.last_commit.id")?,
        head_repo_url: mr.source.and_then(|s| s.git_http_url).filter(|u| !u.is_empty()),
        author: p.user.and_then(|u| u.username).filter(|u| !u.is_empty()),
    }))
}
