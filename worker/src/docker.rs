//! Running steps in containers on the worker's Docker engine, through bollard: the
//! [`DockerExecutor`], and the sweep that removes what an earlier run of this worker left.
//!
//! A step with an image runs either in a fresh container of its own (removed when it ends) or,
//! when the lease says so, in its build's container, made by the build's first such step and
//! reused by the next ones through `docker exec`. The build's checkout is mounted at
//! [`WORKSPACE`]; commands run as the worker's own uid:gid unless the step names a user, so
//! the files they leave there stay the worker's. Everything made here carries the labels
//! [`LABEL_WORKER`] and [`LABEL_BUILD`]: a worker that starts removes every object labelled
//! with its name, which is how a container outlives a killed worker only until its restart.
//!
//! A build's services (a database, a server) start before its first container step: a
//! network of the build's own (labelled too), one container per service with its name as
//! network alias, each waited for (its health command, or running) under a bounded time; the
//! build's containers then join that network. They go when the master says the build ended,
//! at shutdown, or at the next start's sweep. Host paths are mounted read-only, and only under
//! a prefix the worker allows (checked after symlinks are resolved). An image that is not on
//! the engine is pulled only from the configured registry, with its progress in the log.
//!
//! Steps without an image go to the native executor. This module must not know the protocol
//! or the master; a failing command is a result, never an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, EndpointSettings, HealthConfig, HealthStatusEnum, HostConfig,
    NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptions, TagImageOptionsBuilder,
};
use futures::future::BoxFuture;
use futures::{FutureExt as _, Stream, StreamExt as _};
use rbb_schema::proto::StepResult;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::executor::{
    ContainerOptions, Executor, MAX_CHUNK, MountSpec, NativeExecutor, Output, ServiceSpec, StepOutcome, StepSpec,
    cancelled, format_secs,
};

/// Where the build's checkout is mounted inside its containers.
pub const WORKSPACE: &str = "/workspace";
/// Label naming the worker that made a container, network or volume.
pub const LABEL_WORKER: &str = "rbb.worker";
/// Label naming the build a container, network or volume was made for.
pub const LABEL_BUILD: &str = "rbb.build";

/// How long a service without a health command may take to be running.
const SERVICE_START: Duration = Duration::from_secs(30);
/// How often a starting service's state is asked.
const SERVICE_POLL: Duration = Duration::from_millis(100);
/// Lines of a broken service's output shown in the step's log.
const SERVICE_TAIL: usize = 20;

/// After a container has stopped, how long its output may take to drain.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Why the Docker engine cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("no Docker engine answers on this machine's socket: {0}")]
    Unreachable(#[source] BollardError),
    #[error("docker {action}: {source}")]
    Api {
        action: String,
        #[source]
        source: BollardError,
    },
}

/// The registry a worker pulls missing images from.
#[derive(Clone)]
pub struct Registry {
    /// `HOST[:PORT]`, e.g. `registry.example.com:5000`.
    pub host: String,
    /// User name and password, when the registry wants them.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("host", &self.host).field("credentials", &self.credentials.is_some()).finish()
    }
}

/// Runs steps with an image in containers, and the others with a [`NativeExecutor`].
pub struct DockerExecutor {
    docker: Docker,
    worker: String,
    platform: String,
    native: NativeExecutor,
    /// `uid:gid` of this process: the default user in containers.
    own_user: String,
    /// Running build containers, by build id.
    builds: Arc<Mutex<HashMap<u64, BuildContainer>>>,
    /// Host path prefixes a container may mount, each as given and resolved.
    allowed_mounts: Vec<(String, PathBuf)>,
    /// Where missing images come from; `None`: nowhere.
    registry: Option<Registry>,
    /// Each build's services and their network, by build id.
    services: Arc<Mutex<HashMap<u64, BuildServices>>>,
}

#[derive(Debug, Clone)]
struct BuildServices {
    network: String,
    containers: Vec<String>,
}

#[derive(Debug, Clone)]
struct BuildContainer {
    id: String,
    image: String,
    digest: String,
    /// The container-wide settings it was made with: (memory, cpus, network, mounts).
    limits: (u64, u32, String, Vec<MountSpec>),
}

fn limits_of(c: &ContainerOptions) -> (u64, u32, String, Vec<MountSpec>) {
    (c.memory_bytes, c.cpus_milli, c.network.clone(), c.mounts.clone())
}

impl std::fmt::Debug for DockerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerExecutor").field("worker", &self.worker).field("platform", &self.platform).finish()
    }
}

impl DockerExecutor {
    /// Connects to the engine on the local socket (or `DOCKER_HOST`) and checks it answers.
    /// `worker` names this worker in the labels; steps without an image go to `native`.
    pub async fn connect(worker: &str, native: NativeExecutor) -> Result<DockerExecutor, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(DockerError::Unreachable)?;
        let docker = docker.negotiate_version().await.map_err(DockerError::Unreachable)?;
        let version = docker.version().await.map_err(DockerError::Unreachable)?;
        let platform =
            format!("{}/{}", version.os.as_deref().unwrap_or("unknown"), version.arch.as_deref().unwrap_or("unknown"));
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let own_user = unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) };
        Ok(DockerExecutor {
            docker,
            worker: worker.to_owned(),
            platform,
            native,
            own_user,
            builds: Arc::new(Mutex::new(HashMap::new())),
            allowed_mounts: Vec::new(),
            registry: None,
            services: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Lets containers mount host paths under these prefixes (read-only). Each is resolved
    /// now (symlinks, `..`); a prefix that does not exist is an error naming it.
    pub fn allow_mounts(mut self, prefixes: &[PathBuf]) -> Result<DockerExecutor, String> {
        for p in prefixes {
            let resolved = std::fs::canonicalize(p)
                .map_err(|err| format!("--allow-mount {}: cannot resolve it: {err}", p.display()))?;
            self.allowed_mounts.push((p.display().to_string(), resolved));
        }
        Ok(self)
    }

    /// Pulls images that are not on the engine from `registry`.
    pub fn with_registry(mut self, registry: Option<Registry>) -> DockerExecutor {
        self.registry = registry;
        self
    }

    /// The engine's `os/arch`, e.g. `linux/amd64`.
    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// Removes every container, network and volume labelled with this worker's name: what an
    /// earlier run left when it was killed. Returns how many objects were removed.
    pub async fn sweep(&self) -> Result<usize, DockerError> {
        let filter = HashMap::from([("label", vec![format!("{LABEL_WORKER}={}", self.worker)])]);
        let api = |action: &str| {
            let action = action.to_owned();
            move |source| DockerError::Api { action, source }
        };
        let mut removed = 0;
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filter).build()))
            .await
            .map_err(api("listing containers"))?;
        for c in containers {
            let Some(id) = c.id else { continue };
            remove_container(&self.docker, &id).await;
            removed += 1;
        }
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filter).build()))
            .await
            .map_err(api("listing networks"))?;
        for n in networks {
            let Some(id) = n.id else { continue };
            match self.docker.remove_network(&id).await {
                Ok(()) => removed += 1,
                Err(err) => warn!(network = %id, %err, "cannot remove a network left by an earlier run"),
            }
        }
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptionsBuilder::default().filters(&filter).build()))
            .await
            .map_err(api("listing volumes"))?;
        for v in volumes.volumes.unwrap_or_default() {
            match self.docker.remove_volume(&v.name, None::<RemoveVolumeOptions>).await {
                Ok(()) => removed += 1,
                Err(err) => warn!(volume = %v.name, %err, "cannot remove a volume left by an earlier run"),
            }
        }
        if removed > 0 {
            info!(removed, "removed Docker objects left by an earlier run of this worker");
        }
        Ok(removed)
    }

    /// Removes the build containers and services still running (at shutdown).
    pub async fn close(&self) {
        let left: Vec<BuildContainer> = lock(&self.builds).drain().map(|(_, c)| c).collect();
        for c in left {
            remove_container(&self.docker, &c.id).await;
        }
        let builds: Vec<u64> = lock(&self.services).keys().copied().collect();
        for build in builds {
            self.end_services(build).await;
        }
    }

    /// The host paths of `mounts` resolved, each checked against the allowed prefixes; or
    /// why one may not be mounted.
    fn resolve_mounts(&self, mounts: &[MountSpec]) -> Result<Vec<MountSpec>, String> {
        let allowed: Vec<&str> = self.allowed_mounts.iter().map(|(given, _)| given.as_str()).collect();
        let allowed = if allowed.is_empty() { "none".to_owned() } else { allowed.join(", ") };
        mounts
            .iter()
            .map(|m| {
                let resolved = std::fs::canonicalize(&m.source)
                    .map_err(|err| format!("cannot mount {}: {err} (allowed on this worker: {allowed})", m.source))?;
                if !self.allowed_mounts.iter().any(|(_, prefix)| resolved.starts_with(prefix)) {
                    let shown = if resolved == Path::new(&m.source) {
                        String::new()
                    } else {
                        format!(" (it resolves to {})", resolved.display())
                    };
                    return Err(format!(
                        "this worker does not allow mounting {}{shown}; allowed: {allowed} (rbb-worker --allow-mount PATH)",
                        m.source
                    ));
                }
                let source = resolved.to_str().ok_or_else(|| format!("cannot mount {}: not UTF-8", m.source))?;
                if source.contains([':', ',']) {
                    return Err(format!("cannot mount {}: the engine cannot name a path with `:` or `,`", m.source));
                }
                Ok(MountSpec { source: source.to_owned(), target: m.target.clone() })
            })
            .collect()
    }

    /// The image's digest, pulling it first from the configured registry when the engine
    /// lacks it (progress goes to `out`). The error names the image (and the registry).
    async fn ensure_image(&self, image: &str, platform: &str, out: &mpsc::Sender<Output>) -> Result<String, String> {
        match (self.local_digest(image).await?, &self.registry) {
            (Some(digest), _) => Ok(digest),
            (None, Some(registry)) => {
                self.pull(image, platform, registry, out).await?;
                self.inspect_digest(image).await
            }
            (None, None) => self.inspect_digest(image).await,
        }
    }

    async fn pull(
        &self,
        image: &str,
        platform: &str,
        registry: &Registry,
        out: &mpsc::Sender<Output>,
    ) -> Result<(), String> {
        let host = &registry.host;
        let (names_host, rest) = match image.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (Some(first), rest),
            _ => (None, image),
        };
        if let Some(other) = names_host.filter(|h| h != host) {
            return Err(format!(
                "image `{image}` is not on this worker's Docker engine, and it names registry {other}; this worker pulls only from {host}"
            ));
        }
        // `name:tag` or `name@digest`; no tag means `latest` (an empty tag would pull every tag).
        let (name, tag) = match rest.rsplit_once('@') {
            Some((name, digest)) => (name.to_owned(), digest.to_owned()),
            None => match rest.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                Some((name, tag)) => (name.to_owned(), tag.to_owned()),
                None => (rest.to_owned(), "latest".to_owned()),
            },
        };
        let remote = format!("{host}/{name}");
        let started = Instant::now();
        header(out, format!("pulling image `{image}` from registry {host}\n")).await;
        let mut options = CreateImageOptionsBuilder::default().from_image(&remote).tag(&tag);
        if !platform.is_empty() {
            options = options.platform(platform);
        }
        let credentials = registry.credentials.as_ref().map(|(user, password)| DockerCredentials {
            username: Some(user.clone()),
            password: Some(password.clone()),
            serveraddress: Some(host.clone()),
            ..Default::default()
        });
        let failed = |err: String| format!("cannot pull image `{image}` from registry {host}: {err}");
        let mut progress = self.docker.create_image(Some(options.build()), None, credentials);
        let mut last: HashMap<String, String> = HashMap::new();
        while let Some(item) = progress.next().await {
            let info = item.map_err(|err| failed(err.to_string()))?;
            if let Some(err) = info.error_detail.and_then(|e| e.message) {
                return Err(failed(err));
            }
            let Some(status) = info.status else { continue };
            let id = info.id.unwrap_or_default();
            // One line per layer and state, not per progress tick.
            if last.get(&id) != Some(&status) {
                let line = if id.is_empty() { format!("pull: {status}\n") } else { format!("pull: {id}: {status}\n") };
                header(out, line).await;
                last.insert(id, status);
            }
        }
        if names_host.is_none() {
            let tag_options = TagImageOptionsBuilder::default().repo(&name).tag(&tag).build();
            let pulled = if tag.starts_with("sha256:") { format!("{remote}@{tag}") } else { format!("{remote}:{tag}") };
            self.docker.tag_image(&pulled, Some(tag_options)).await.map_err(|err| failed(err.to_string()))?;
        }
        header(out, format!("pulled `{image}` in {:.1} s\n", started.elapsed().as_secs_f64())).await;
        Ok(())
    }

    /// The build's services, started (and waited for) on its network if they are not yet;
    /// the network's name, or the step's outcome when one cannot start.
    async fn ensure_services(
        &self,
        spec: &StepSpec,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
        start: Instant,
    ) -> Result<String, StepOutcome> {
        let build = spec.container.build;
        if let Some(s) = lock(&self.services).get(&build) {
            return Ok(s.network.clone());
        }
        let network = self.container_name(build, "net");
        let request = NetworkCreateRequest {
            name: network.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(self.labels(build)),
            ..Default::default()
        };
        if let Err(err) = self.docker.create_network(request).await {
            return Err(StepOutcome::exception(format!("cannot create the build's network: {err}"), start.elapsed()));
        }
        lock(&self.services).insert(build, BuildServices { network: network.clone(), containers: Vec::new() });
        let mut started = Vec::new();
        for service in &spec.container.services {
            match self.start_service(service, build, &network, out).await {
                Ok(id) => {
                    if let Some(s) = lock(&self.services).get_mut(&build) {
                        s.containers.push(id.clone());
                    }
                    started.push((service, id, Instant::now()));
                }
                Err(reason) => {
                    self.end_services(build).await;
                    return Err(failure(reason, start));
                }
            }
        }
        for (service, id, since) in started {
            let ready = tokio::select! {
                ready = self.wait_ready(service, &id) => ready,
                () = cancel.cancelled() => {
                    self.end_services(build).await;
                    return Err(cancelled(start.elapsed()));
                }
            };
            match ready {
                Ok(how) => {
                    let secs = since.elapsed().as_secs_f64();
                    header(
                        out,
                        format!("service {}: image {}, {how} after {secs:.1} s\n", service.name, service.image),
                    )
                    .await;
                }
                Err(reason) => {
                    for line in self.last_output(&id).await {
                        header(out, format!("service {} | {line}\n", service.name)).await;
                    }
                    self.end_services(build).await;
                    return Err(failure(reason, start));
                }
            }
        }
        Ok(network)
    }

    async fn start_service(
        &self,
        service: &ServiceSpec,
        build: u64,
        network: &str,
        out: &mpsc::Sender<Output>,
    ) -> Result<String, String> {
        let name = &service.name;
        self.ensure_image(&service.image, "", out).await.map_err(|reason| format!("service {name}: {reason}"))?;
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let healthcheck = service.health.as_ref().map(|h| HealthConfig {
            test: Some(vec!["CMD-SHELL".to_owned(), h.command.clone()]),
            interval: Some(nanos(h.interval)),
            timeout: Some(nanos(h.timeout)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(0),
            start_interval: None,
        });
        let body = ContainerCreateBody {
            image: Some(service.image.clone()),
            cmd: service.command.as_ref().map(|c| vec!["sh".to_owned(), "-c".to_owned(), c.clone()]),
            env: Some(service.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(self.labels(build)),
            healthcheck,
            host_config: Some(HostConfig { network_mode: Some(network.to_owned()), ..Default::default() }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.to_owned(),
                    EndpointSettings { aliases: Some(vec![name.clone()]), ..Default::default() },
                )])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&self.container_name(build, name)).build();
        let id = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|err| format!("service {name}: cannot create a container of `{}`: {err}", service.image))?
            .id;
        if let Err(err) = self.docker.start_container(&id, None).await {
            remove_container(&self.docker, &id).await;
            return Err(format!("service {name}: cannot start its container: {err}"));
        }
        debug!(container = %id, service = %name, build, "service started");
        Ok(id)
    }

    /// Waits until the service is ready: healthy, or running when it has no health command.
    /// Bounded: the health check's own retries (plus slack), or [`SERVICE_START`].
    async fn wait_ready(&self, service: &ServiceSpec, id: &str) -> Result<&'static str, String> {
        let name = &service.name;
        let limit = match &service.health {
            Some(h) => (h.interval + h.timeout) * (h.retries + 1) + Duration::from_secs(10),
            None => SERVICE_START,
        };
        let since = Instant::now();
        loop {
            let inspect = self
                .docker
                .inspect_container(id, None)
                .await
                .map_err(|err| format!("service {name}: cannot inspect its container: {err}"))?;
            let state = inspect.state.unwrap_or_default();
            if matches!(state.status, Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)) {
                return Err(format!(
                    "service {name} exited with code {} before it was ready",
                    state.exit_code.unwrap_or_default()
                ));
            }
            let running = state.running.unwrap_or(false);
            match (&service.health, state.health.as_ref().and_then(|h| h.status)) {
                (None, _) if running => return Ok("running"),
                (Some(_), Some(HealthStatusEnum::HEALTHY)) => return Ok("healthy"),
                (Some(h), Some(HealthStatusEnum::UNHEALTHY)) => {
                    let last = state
                        .health
                        .and_then(|h| h.log)
                        .and_then(|log| log.into_iter().last())
                        .and_then(|r| r.output)
                        .map(|o| o.trim().chars().take(300).collect::<String>())
                        .filter(|o| !o.is_empty())
                        .map(|o| format!("; last check said: {o}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "service {name} never became healthy: `{}` failed {} times{last}",
                        h.command, h.retries
                    ));
                }
                _ => {}
            }
            if since.elapsed() > limit {
                return Err(format!("service {name} was not ready after {}", format_secs(limit)));
            }
            tokio::time::sleep(SERVICE_POLL).await;
        }
    }

    /// The last lines a service printed (stdout and stderr), for the step's log.
    async fn last_output(&self, id: &str) -> Vec<String> {
        let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail(&SERVICE_TAIL.to_string()).build();
        let mut logs = self.docker.logs(id, Some(options));
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = logs.next().await {
            text.extend_from_slice(&chunk.into_bytes());
        }
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.is_empty() { vec!["(no output)".to_owned()] } else { lines }
    }

    /// Removes the build's services and then their network; nothing to do without them.
    async fn end_services(&self, build: u64) {
        let Some(services) = lock(&self.services).remove(&build) else { return };
        for id in &services.containers {
            remove_container(&self.docker, id).await;
        }
        if let Err(err) = self.docker.remove_network(&services.network).await {
            warn!(network = %services.network, %err, "cannot remove a build's network");
        }
    }

    fn labels(&self, build: u64) -> HashMap<String, String> {
        HashMap::from([(LABEL_WORKER.to_owned(), self.worker.clone()), (LABEL_BUILD.to_owned(), build.to_string())])
    }

    /// A container name unique on the engine: worker, build and a per-process counter.
    fn container_name(&self, build: u64, what: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let worker: String =
            self.worker.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect();
        format!("rbb-{worker}-{build}-{what}-{}-{n}", std::process::id())
    }

    /// The image's digest, or a reason naming it when it is not on this engine.
    async fn inspect_digest(&self, image: &str) -> Result<String, String> {
        self.local_digest(image).await?.ok_or_else(|| match &self.registry {
            None => format!(
                "image `{image}` is not on this worker's Docker engine (no registry to pull it from is configured)"
            ),
            Some(r) => format!("image `{image}` is not on this worker's Docker engine (nor pulled from {})", r.host),
        })
    }

    /// The image's digest on this engine, `None` when the engine lacks it.
    async fn local_digest(&self, image: &str) -> Result<Option<String>, String> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(Some(
                inspect
                    .repo_digests
                    .and_then(|d| d.into_iter().next())
                    .and_then(|d| d.split_once('@').map(|(_, digest)| digest.to_owned()))
                    .or(inspect.id)
                    .unwrap_or_default(),
            )),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(err) => Err(format!("cannot inspect image `{image}`: {err}")),
        }
    }

    /// The container's configuration for a step of `spec`: its checkout mounted at
    /// [`WORKSPACE`], its limits, user and labels.
    fn create_body(&self, spec: &StepSpec, image: &str, cmd: Vec<String>) -> ContainerCreateBody {
        let c = &spec.container;
        let mut binds = vec![format!("{}:{WORKSPACE}", c.checkout.display())];
        binds.extend(c.mounts.iter().map(|m| format!("{}:{}:ro", m.source, m.target)));
        let host_config = HostConfig {
            binds: Some(binds),
            memory: (c.memory_bytes > 0).then(|| i64::try_from(c.memory_bytes).unwrap_or(i64::MAX)),
            memory_swap: (c.memory_bytes > 0).then(|| i64::try_from(c.memory_bytes).unwrap_or(i64::MAX)),
            nano_cpus: (c.cpus_milli > 0).then(|| i64::from(c.cpus_milli) * 1_000_000),
            network_mode: (!c.network.is_empty()).then(|| c.network.clone()),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(cmd),
            env: Some(env_list(spec)),
            working_dir: Some(container_cwd(spec)),
            user: Some(self.user(&spec.container)),
            labels: Some(self.labels(c.build)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    fn user(&self, c: &ContainerOptions) -> String {
        if c.user.is_empty() { self.own_user.clone() } else { c.user.clone() }
    }

    async fn run_step(&self, mut spec: StepSpec, out: mpsc::Sender<Output>, cancel: CancellationToken) -> StepOutcome {
        let start = Instant::now();
        let Some(image) = spec.image.clone().filter(|i| !i.is_empty()) else {
            return self.native.run(spec, out, cancel).await;
        };
        if cancel.is_cancelled() {
            return cancelled(start.elapsed());
        }
        // The engine mounts absolute host paths only.
        for path in [&mut spec.cwd, &mut spec.container.checkout] {
            if let Ok(absolute) = std::path::absolute(&*path) {
                *path = absolute;
            }
        }
        // Checked again here, whatever the master decided: only allowed paths, resolved.
        match self.resolve_mounts(&spec.container.mounts) {
            Ok(resolved) => spec.container.mounts = resolved,
            Err(reason) => return failure(reason, start),
        }
        let platform = &spec.container.platform;
        if !platform.is_empty() && *platform != self.platform {
            return failure(
                format!("this worker's Docker engine runs {} images, not {platform}", self.platform),
                start,
            );
        }
        if container_cwd_checked(&spec).is_none() {
            return StepOutcome::exception(
                format!(
                    "working directory {} is not inside the checkout {}",
                    spec.cwd.display(),
                    spec.container.checkout.display()
                ),
                start.elapsed(),
            );
        }
        if !spec.container.services.is_empty() {
            match self.ensure_services(&spec, &out, &cancel, start).await {
                Ok(network) => spec.container.network = network,
                Err(outcome) => return outcome,
            }
        }
        let mut outcome = if spec.container.build_container {
            self.run_in_build_container(&spec, &image, &out, &cancel, start).await
        } else {
            self.run_in_own_container(&spec, &image, &out, &cancel, start).await
        };
        outcome.duration = start.elapsed();
        outcome
    }

    /// A fresh container for this step alone, removed when it ends.
    async fn run_in_own_container(
        &self,
        spec: &StepSpec,
        image: &str,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
        start: Instant,
    ) -> StepOutcome {
        let digest = match self.ensure_image(image, &spec.container.platform, out).await {
            Ok(digest) => digest,
            Err(reason) => return StepOutcome::exception(reason, start.elapsed()),
        };
        let name = self.container_name(spec.container.build, "step");
        let body = self.create_body(spec, image, vec!["sh".into(), "-c".into(), spec.command.clone()]);
        let mut options = CreateContainerOptionsBuilder::default().name(&name);
        if !spec.container.platform.is_empty() {
            options = options.platform(&spec.container.platform);
        }
        let id = match self.docker.create_container(Some(options.build()), body).await {
            Ok(created) => created.id,
            Err(err) => {
                return StepOutcome::exception(
                    format!("cannot create a container of `{image}`: {err}"),
                    start.elapsed(),
                );
            }
        };
        debug!(container = %id, %image, "step container created");
        let mut outcome = self.attach_start_wait(&id, spec, out, cancel, start).await;
        remove_container(&self.docker, &id).await;
        outcome.image_digest = digest;
        outcome
    }

    async fn attach_start_wait(
        &self,
        id: &str,
        spec: &StepSpec,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
        start: Instant,
    ) -> StepOutcome {
        let attach = AttachContainerOptionsBuilder::default().stdout(true).stderr(true).stream(true).logs(true).build();
        let output = match self.docker.attach_container(id, Some(attach)).await {
            Ok(attached) => attached.output,
            Err(err) => {
                return StepOutcome::exception(format!("cannot attach to the container: {err}"), start.elapsed());
            }
        };
        if let Err(err) = self.docker.start_container(id, None).await {
            return StepOutcome::exception(format!("cannot start the container: {err}"), start.elapsed());
        }
        let exited = CancellationToken::new();
        let waiter = async {
            let ending = tokio::select! {
                code = wait_exit(&self.docker, id) => Ending::Exited(code),
                () = sleep_opt(spec.timeout) => Ending::TimedOut(spec.timeout.unwrap_or_default()),
                () = cancel.cancelled() => Ending::Cancelled,
            };
            if !matches!(ending, Ending::Exited(_)) {
                kill_container(&self.docker, id).await;
            }
            exited.cancel();
            ending
        };
        let (ending, ()) = tokio::join!(waiter, pump(output, out, &exited));
        match ending {
            Ending::Exited(Ok(code)) => {
                let oom = code == 137 && self.oom_killed(id).await;
                exit_outcome(code, oom)
            }
            Ending::Exited(Err(err)) => {
                StepOutcome::exception(format!("waiting for the container: {err}"), start.elapsed())
            }
            Ending::TimedOut(limit) => timed_out(limit),
            Ending::Cancelled => cancelled(start.elapsed()),
        }
    }

    /// Whether the kernel's OOM killer ended the container. The engine learns it from an
    /// event that can arrive just after the exit (later on a loaded machine), so a kill (137)
    /// is asked about for up to two seconds before it is reported as a plain kill.
    async fn oom_killed(&self, id: &str) -> bool {
        for _ in 0..40 {
            match self.docker.inspect_container(id, None).await {
                Ok(inspect) if inspect.state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false) => return true,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                Err(_) => return false,
            }
        }
        false
    }

    /// The build's long-lived container (made on first use), the step run in it by `docker exec`.
    async fn run_in_build_container(
        &self,
        spec: &StepSpec,
        image: &str,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
        start: Instant,
    ) -> StepOutcome {
        let build = spec.container.build;
        let existing = lock(&self.builds).get(&build).cloned();
        let container = match existing {
            Some(c) if c.image == image && c.limits == limits_of(&spec.container) => c,
            // Other limits than the build container's need a container of their own.
            Some(c) if c.image == image => {
                let outcome = self.run_in_own_container(spec, image, out, cancel, start).await;
                if spec.container.last_in_container {
                    lock(&self.builds).remove(&build);
                    remove_container(&self.docker, &c.id).await;
                }
                return outcome;
            }
            other => {
                if let Some(stale) = other {
                    lock(&self.builds).remove(&build);
                    remove_container(&self.docker, &stale.id).await;
                }
                match self.start_build_container(spec, image, out).await {
                    Ok(c) => {
                        lock(&self.builds).insert(build, c.clone());
                        c
                    }
                    Err(reason) => return StepOutcome::exception(reason, start.elapsed()),
                }
            }
        };
        let mut outcome = self.exec(&container.id, spec, out, cancel, start).await;
        outcome.image_digest = container.digest.clone();
        // A container that was killed is of no use to later steps; the last step's is done.
        if spec.container.last_in_container
            || matches!(outcome.result, StepResult::Cancelled | StepResult::Exception)
            || outcome.reason.starts_with("timed out")
        {
            lock(&self.builds).remove(&build);
            remove_container(&self.docker, &container.id).await;
        }
        outcome
    }

    async fn start_build_container(
        &self,
        spec: &StepSpec,
        image: &str,
        out: &mpsc::Sender<Output>,
    ) -> Result<BuildContainer, String> {
        let digest = self.ensure_image(image, &spec.container.platform, out).await?;
        let name = self.container_name(spec.container.build, "build");
        // Idles until removed; each step is an exec into it.
        let idle = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done".to_owned();
        let mut body = self.create_body(spec, image, vec!["sh".into(), "-c".into(), idle]);
        body.working_dir = Some(WORKSPACE.to_owned());
        body.env = None;
        let mut options = CreateContainerOptionsBuilder::default().name(&name);
        if !spec.container.platform.is_empty() {
            options = options.platform(&spec.container.platform);
        }
        let id = self
            .docker
            .create_container(Some(options.build()), body)
            .await
            .map_err(|err| format!("cannot create a container of `{image}`: {err}"))?
            .id;
        if let Err(err) = self.docker.start_container(&id, None).await {
            remove_container(&self.docker, &id).await;
            return Err(format!("cannot start the build's container of `{image}`: {err}"));
        }
        debug!(container = %id, %image, build = spec.container.build, "build container started");
        Ok(BuildContainer { id, image: image.to_owned(), digest, limits: limits_of(&spec.container) })
    }

    async fn exec(
        &self,
        container: &str,
        spec: &StepSpec,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
        start: Instant,
    ) -> StepOutcome {
        let config = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            env: Some(env_list(spec)),
            cmd: Some(vec!["sh".to_owned(), "-c".to_owned(), spec.command.clone()]),
            user: Some(self.user(&spec.container)),
            working_dir: Some(container_cwd(spec)),
            ..Default::default()
        };
        let exec_id = match self.docker.create_exec(container, config).await {
            Ok(created) => created.id,
            Err(err) => {
                return StepOutcome::exception(format!("cannot exec in the build's container: {err}"), start.elapsed());
            }
        };
        let output = match self.docker.start_exec(&exec_id, None).await {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return StepOutcome::exception("the exec started detached", start.elapsed());
            }
            Err(err) => return StepOutcome::exception(format!("cannot start the exec: {err}"), start.elapsed()),
        };
        // The exec's output ends when its process does (or when the container is killed).
        let ended = CancellationToken::new();
        let pumping = pump(output, out, &ended);
        tokio::pin!(pumping);
        let ending = tokio::select! {
            () = &mut pumping => Ending::Exited(Ok(0)),
            () = sleep_opt(spec.timeout) => Ending::TimedOut(spec.timeout.unwrap_or_default()),
            () = cancel.cancelled() => Ending::Cancelled,
        };
        if !matches!(ending, Ending::Exited(_)) {
            // An exec cannot be signalled through the API: the whole build container goes.
            kill_container(&self.docker, container).await;
            ended.cancel();
            pumping.await;
        }
        match ending {
            Ending::Exited(_) => match self.docker.inspect_exec(&exec_id).await {
                Ok(inspect) => match inspect.exit_code {
                    Some(code) => exit_outcome(code, false),
                    None => StepOutcome::exception("the exec has no exit code", start.elapsed()),
                },
                Err(err) => StepOutcome::exception(format!("inspecting the exec: {err}"), start.elapsed()),
            },
            Ending::TimedOut(limit) => timed_out(limit),
            Ending::Cancelled => cancelled(start.elapsed()),
        }
    }
}

impl Executor for DockerExecutor {
    fn run(&self, spec: StepSpec, out: mpsc::Sender<Output>, cancel: CancellationToken) -> BoxFuture<'_, StepOutcome> {
        Box::pin(self.run_step(spec, out, cancel))
    }

    fn image_digest<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { if image.is_empty() { Ok(String::new()) } else { self.inspect_digest(image).await } })
    }

    fn end_build_container(&self, build: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let container = lock(&self.builds).remove(&build);
            if let Some(c) = container {
                remove_container(&self.docker, &c.id).await;
            }
            // After the build's container: a network with containers on it cannot go.
            self.end_services(build).await;
        })
    }

    fn image_platform(&self) -> Option<String> {
        Some(self.platform.clone())
    }

    fn allowed_mounts(&self) -> Vec<String> {
        self.allowed_mounts.iter().map(|(_, resolved)| resolved.display().to_string()).collect()
    }
}

/// A line the worker writes into the step's log.
async fn header(out: &mpsc::Sender<Output>, line: String) {
    let _ = out.send(Output::Header(line.into_bytes())).await;
}

/// FAILURE for what the pipeline asks and cannot have: a service that does not start or
/// never becomes healthy, a mount this worker does not allow, another platform.
fn failure(reason: String, start: Instant) -> StepOutcome {
    StepOutcome {
        result: StepResult::Failure,
        exit_code: None,
        reason,
        duration: start.elapsed(),
        image_digest: String::new(),
    }
}

enum Ending {
    Exited(Result<i64, BollardError>),
    TimedOut(Duration),
    Cancelled,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn env_list(spec: &StepSpec) -> Vec<String> {
    spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `cwd` as seen inside the container, or `None` when it is outside the checkout.
fn container_cwd_checked(spec: &StepSpec) -> Option<String> {
    let rel = spec.cwd.strip_prefix(&spec.container.checkout).ok()?;
    Some(Path::new(WORKSPACE).join(rel).to_string_lossy().trim_end_matches('/').to_owned())
}

fn container_cwd(spec: &StepSpec) -> String {
    container_cwd_checked(spec).unwrap_or_else(|| WORKSPACE.to_owned())
}

/// The container's exit code. bollard reports a non-zero exit as an error value carrying
/// the code: that is a result, not a failure to wait.
async fn wait_exit(docker: &Docker, id: &str) -> Result<i64, BollardError> {
    let mut waits = docker.wait_container(id, None);
    match waits.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(err)) => Err(err),
        None => Err(BollardError::DockerContainerWaitError { error: "the wait stream ended".to_owned(), code: -1 }),
    }
}

async fn kill_container(docker: &Docker, id: &str) {
    let options = KillContainerOptionsBuilder::default().signal("KILL").build();
    if let Err(err) = docker.kill_container(id, Some(options)).await {
        debug!(container = %id, %err, "kill (it may have stopped already)");
    }
}

/// Removes a container, running or not, with its anonymous volumes; absence is fine.
async fn remove_container(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(err) => warn!(container = %id, %err, "cannot remove a container"),
    }
}

fn exit_outcome(code: i64, oom: bool) -> StepOutcome {
    let code32 = i32::try_from(code).unwrap_or(i32::MAX);
    let (result, reason) = match code {
        0 => (StepResult::Success, String::new()),
        137 if oom => (StepResult::Failure, "exit code 137 (killed: out of memory)".to_owned()),
        137 => (StepResult::Failure, "exit code 137 (killed)".to_owned()),
        _ => (StepResult::Failure, format!("exit code {code}")),
    };
    StepOutcome { result, exit_code: Some(code32), reason, duration: Duration::ZERO, image_digest: String::new() }
}

fn timed_out(limit: Duration) -> StepOutcome {
    StepOutcome {
        result: StepResult::Failure,
        exit_code: None,
        reason: format!("timed out after {}", format_secs(limit)),
        duration: Duration::ZERO,
        image_digest: String::new(),
    }
}

async fn sleep_opt(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, BollardError>> + Send>>;

/// Copies a container's output to `out`, joining frames that are already waiting into chunks
/// of at most [`MAX_CHUNK`] bytes (the engine frames output per write, often per line). Once
/// `ended` fires, a stream silent for [`DRAIN_AFTER_EXIT`] is abandoned.
async fn pump(mut stream: OutputStream, out: &mpsc::Sender<Output>, ended: &CancellationToken) {
    let mut pending: Option<Output> = None;
    let mut receiver_gone = false;
    loop {
        let item = match pending {
            Some(_) => match stream.next().now_or_never() {
                Some(item) => item,
                None => {
                    flush(&mut pending, out, &mut receiver_gone).await;
                    continue;
                }
            },
            None if ended.is_cancelled() => match tokio::time::timeout(DRAIN_AFTER_EXIT, stream.next()).await {
                Ok(item) => item,
                Err(_) => return,
            },
            None => tokio::select! {
                item = stream.next() => item,
                () = ended.cancelled() => continue,
            },
        };
        let (stderr, data) = match item {
            None => break,
            Some(Err(err)) => {
                debug!(%err, "container output ended with an error");
                break;
            }
            Some(Ok(LogOutput::StdErr { message })) => (true, message),
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => (false, message),
            Some(Ok(LogOutput::StdIn { .. })) => continue,
        };
        let fits = match &pending {
            Some(Output::Stderr(buf)) => stderr && buf.len() + data.len() <= MAX_CHUNK,
            Some(Output::Stdout(buf)) => !stderr && buf.len() + data.len() <= MAX_CHUNK,
            _ => false,
        };
        if !fits {
            flush(&mut pending, out, &mut receiver_gone).await;
        }
        match &mut pending {
            Some(Output::Stdout(buf) | Output::Stderr(buf)) => buf.extend_from_slice(&data),
            _ => pending = Some(if stderr { Output::Stderr(data.to_vec()) } else { Output::Stdout(data.to_vec()) }),
        }
    }
    flush(&mut pending, out, &mut receiver_gone).await;
}

async fn flush(pending: &mut Option<Output>, out: &mpsc::Sender<Output>, receiver_gone: &mut bool) {
    if let Some(chunk) = pending.take()
        && !*receiver_gone
        && out.send(chunk).await.is_err()
    {
        *receiver_gone = true;
    }
}
