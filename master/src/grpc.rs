//! The worker-facing gRPC service: checks who is connecting, then relays the session's
//! messages to the [`Engine`] and the engine's messages to the worker. It decides nothing.

use crate::engine::{Engine, EngineError, LookupError, Refusal};
use rbb_schema::proto::{self, MasterMessage, WorkerMessage, worker_message::Msg, worker_server::Worker};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerService {
    pub engine: Arc<Engine>,
    /// Which workers must present a client certificate naming them.
    pub certs: ClientCerts,
}

impl WorkerService {
    /// A service that asks no worker for a client certificate.
    pub fn new(engine: Arc<Engine>) -> WorkerService {
        WorkerService { engine, certs: ClientCerts::default() }
    }

    /// [`check_caller`], then the client certificate when this worker must present one.
    fn check<T>(&self, req: &Request<T>) -> Result<(String, String), Status> {
        let (name, peer) = check_caller(&self.engine, req)?;
        self.certs.check(&name, req.extensions().get::<crate::tls::PeerInfo>())?;
        Ok((name, peer))
    }
}

/// Which workers must present a client certificate (mutual TLS) whose subject names them.
#[derive(Debug, Clone, Default)]
pub struct ClientCerts {
    /// Every worker (`tls.require_client_cert`).
    pub all: bool,
    /// These workers (`require_client_cert` on the worker).
    pub workers: std::collections::BTreeSet<String>,
}

impl ClientCerts {
    /// Refuses (and logs, with the peer and the reason) a worker that must present a
    /// certificate naming it and did not. `peer` is `None` on a plain-text port.
    pub fn check(&self, name: &str, peer: Option<&crate::tls::PeerInfo>) -> Result<(), Status> {
        if !(self.all || self.workers.contains(name)) {
            return Ok(());
        }
        let addr = peer.map_or_else(|| "unknown".to_owned(), |p| p.addr.to_string());
        let reason = match peer.map(|p| &p.cert_names) {
            None => "it connected without TLS".to_owned(),
            Some(None) => "it presented no client certificate".to_owned(),
            Some(Some(names)) if names.iter().any(|n| n == name) => return Ok(()),
            Some(Some(names)) => format!(
                "its client certificate names {}, not `{name}`",
                if names.is_empty() { "nobody".to_owned() } else { names.join(", ") }
            ),
        };
        tracing::warn!(peer = %addr, worker = %name, %reason, "refused a worker: a client certificate is required");
        Err(Status::permission_denied(format!(
            "worker `{name}` must present a client certificate whose subject is `{name}` (signed by the master's tls.client_ca): {reason}"
        )))
    }
}

fn header<'a, T>(req: &'a Request<T>, name: &str) -> Option<&'a str> {
    req.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// Checks the protocol version, the worker's name and its token on any call (the session
/// and the cache calls alike); logs and refuses a caller that fails. Returns the worker's
/// name and the peer's address.
pub fn check_caller<T>(engine: &Engine, req: &Request<T>) -> Result<(String, String), Status> {
    let peer = req
        .remote_addr()
        .or_else(|| req.extensions().get::<crate::tls::PeerInfo>().map(|p| p.addr))
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let version = header(req, "rbb-protocol").unwrap_or("").to_owned();
    if version != proto::PROTOCOL_VERSION {
        tracing::warn!(%peer, version, "refused a worker speaking another protocol version");
        return Err(Status::failed_precondition(format!(
            "this master speaks worker protocol {}, the worker speaks {}; run the same rbb version on both",
            proto::PROTOCOL_VERSION,
            if version.is_empty() { "none" } else { &version }
        )));
    }
    let name = header(req, "rbb-worker").unwrap_or("").to_owned();
    let token = header(req, "authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("").to_owned();
    match engine.authenticate(&name, &token) {
        Ok(()) => Ok((name, peer)),
        Err(Refusal::UnknownWorker) => {
            tracing::warn!(%peer, worker = %name, "refused an unknown worker");
            Err(Status::permission_denied(format!("no worker named `{name}` is configured on this master")))
        }
        Err(Refusal::BadToken) => {
            tracing::warn!(%peer, worker = %name, "refused a worker with a wrong token");
            Err(Status::unauthenticated(format!("wrong token for worker `{name}`")))
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send + 'static>>;

    async fn session(&self, req: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let (name, peer) = self.check(&req)?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.next()).await {
            Ok(Some(Ok(WorkerMessage { msg: Some(Msg::Hello(h)) }))) => h,
            _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
        };
        if hello.name != name {
            return Err(Status::invalid_argument(format!(
                "Hello names `{}` but the metadata names `{name}`",
                hello.name
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let engine = self.engine.clone();
        let joined = tokio::task::spawn_blocking(move || engine.connect(&hello, tx, &peer)).await;
        let connected = match joined.map_err(|e| Status::internal(format!("cannot accept the worker: {e}")))? {
            Ok(c) => c,
            Err(EngineError::Conflict(m)) => return Err(Status::already_exists(m)),
            Err(EngineError::ShuttingDown) => return Err(Status::unavailable("the master is shutting down")),
            Err(e) => {
                tracing::error!(worker = %name, error = %e, "cannot accept a worker");
                return Err(Status::internal("the master cannot accept the worker now; see its log"));
            }
        };
        let (session, liveness) = (connected.session, connected.liveness);
        // The reader stamps liveness as each message arrives and hands it on; the handler
        // applies messages in order. Applying one never waits for the disk (transactions are
        // written without an fsync); when a change must be made durable, the group-commit
        // flush runs on the blocking pool, so the runtime's threads never wait on an fsync.
        // The queue is short: log chunks are up to 1 MiB each.
        let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<Msg>(8);
        let engine = self.engine.clone();
        let reader_liveness = liveness.clone();
        let reader = tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(WorkerMessage { msg: Some(m) })) => {
                        reader_liveness.arrived(&engine);
                        if work_tx.send(m).await.is_err() {
                            break "the master stopped handling it".to_owned();
                        }
                    }
                    Some(Ok(_)) => reader_liveness.arrived(&engine),
                    Some(Err(e)) => break format!("stream error: {}", e.message()),
                    None => break "it closed the session".to_owned(),
                }
            }
        });
        let engine = self.engine.clone();
        tokio::spawn(async move {
            while let Some(m) = work_rx.recv().await {
                let r = engine.receive(&name, session, m);
                liveness.handled();
                if let Err(e) = r {
                    tracing::error!(worker = %name, error = %e, "cannot record a worker message");
                }
                settle(&engine).await;
            }
            let why = reader.await.unwrap_or_else(|e| format!("reader failed: {e}"));
            let e = engine.clone();
            let worker = name.clone();
            let _ = tokio::task::spawn_blocking(move || e.disconnect(&worker, session, &why)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lookup(&self, req: Request<proto::CacheQuery>) -> Result<Response<proto::CacheAnswer>, Status> {
        let (name, _) = self.check(&req)?;
        let query = req.into_inner();
        let engine = self.engine.clone();
        let answer = tokio::task::spawn_blocking(move || engine.cache_lookup(&name, &query))
            .await
            .map_err(|e| Status::internal(format!("lookup failed: {e}")))?;
        match answer {
            Ok(a) => Ok(Response::new(a)),
            Err(e @ (LookupError::NoLease(_) | LookupError::NotCacheable(_))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e @ LookupError::Key(_)) => {
                tracing::warn!(error = %e, "cannot compute a step's cache key; it runs");
                Err(Status::unavailable(e.to_string()))
            }
            Err(LookupError::Engine(e)) => {
                tracing::error!(error = %e, "cache lookup failed");
                Err(Status::unavailable("the master cannot read its cache now; see its log"))
            }
        }
    }

    async fn missing_blobs(&self, req: Request<proto::BlobList>) -> Result<Response<proto::BlobList>, Status> {
        self.check(&req)?;
        crate::cache::rpc::missing_blobs(self.engine.clone(), req.into_inner()).await.map(Response::new)
    }

    type GetBlobStream = Pin<Box<dyn Stream<Item = Result<proto::BlobData, Status>> + Send + 'static>>;

    async fn get_blob(&self, req: Request<proto::BlobRef>) -> Result<Response<Self::GetBlobStream>, Status> {
        self.check(&req)?;
        let stream = crate::cache::rpc::get_blob(self.engine.clone(), req.into_inner().digest).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_blob(&self, req: Request<Streaming<proto::BlobData>>) -> Result<Response<proto::BlobStored>, Status> {
        self.check(&req)?;
        crate::cache::rpc::put_blob(self.engine.clone(), req.into_inner()).await.map(Response::new)
    }
}

/// Has pending changes made durable (and what waited for that announced) on the blocking
/// pool, unless a flush is already on its way (that one takes these changes too), and
/// waits for it without holding a thread: a session reads its worker's next message once
/// the last one is durable, so what it is sent back stays within its queue.
async fn settle(engine: &Arc<Engine>) {
    let Some((target, run)) = engine.flush_needed() else { return };
    if run {
        let e = engine.clone();
        drop(tokio::task::spawn_blocking(move || e.settle()));
    }
    engine.durable_reached(target).await;
}
