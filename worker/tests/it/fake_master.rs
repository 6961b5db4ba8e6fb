//! A small in-test master speaking the real protocol (`rbb.worker.v1.Worker/Session`) on
//! 127.0.0.1, so the worker's session can be tested without the real master. Each accepted
//! session is handed to the test as a [`MasterSession`] it drives message by message. The
//! cache calls answer from a [`FakeCache`] the test fills (Lookup's answer, blobs in memory)
//! and reads afterwards (queries, uploads).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use rbb_schema::proto::master_message::Msg as MasterMsg;
use rbb_schema::proto::worker_message::Msg;
use rbb_schema::proto::worker_server::{Worker, WorkerServer};
use rbb_schema::proto::{self, Hello, MasterMessage, StepFinished, Welcome, WorkerMessage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

/// How long any single expected message may take.
const RECV_LIMIT: Duration = Duration::from_secs(15);

pub struct FakeMaster {
    pub addr: SocketAddr,
    /// What the cache calls answer, and what they received.
    pub cache: Arc<FakeCache>,
    sessions: mpsc::UnboundedReceiver<MasterSession>,
    /// Ends every open session stream.
    kill: CancellationToken,
    /// Stops accepting and shuts the server down.
    stop: CancellationToken,
    server: JoinHandle<()>,
}

/// One worker session as the master sees it.
pub struct MasterSession {
    pub metadata: MetadataMap,
    /// `None` once [`MasterSession::hang_up`] ended the master's side.
    to_worker: Option<mpsc::Sender<MasterMessage>>,
    from_worker: mpsc::UnboundedReceiver<WorkerMessage>,
    /// Heartbeats received so far (they are skipped by [`MasterSession::recv`]).
    pub heartbeats: usize,
}

/// The fake master's step cache: answers set by the test, calls recorded for it.
#[derive(Default)]
pub struct FakeCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
pub struct CacheState {
    /// Lookup's answer, or the status it fails with; `None`: UNIMPLEMENTED.
    pub lookup: Option<Result<proto::CacheAnswer, Code>>,
    /// Blobs by digest, served as they are (a wrong content is served too).
    pub blobs: HashMap<String, Vec<u8>>,
    /// GetBlob fails with this status for these digests.
    pub get_errors: HashMap<String, Code>,
    /// GetBlob never sends anything for these digests.
    pub get_hangs: HashSet<String>,
    /// MissingBlobs never answers.
    pub missing_hangs: bool,
    /// Every Lookup received.
    pub queries: Vec<proto::CacheQuery>,
    /// Every MissingBlobs request's digests.
    pub asked: Vec<Vec<String>>,
    /// Digests of every GetBlob.
    pub fetched: Vec<String>,
    /// Every blob uploaded and kept (digest and size were in the first message, content checked).
    pub puts: Vec<(String, u64)>,
    /// The `authorization` metadata of every cache call.
    pub authorizations: Vec<String>,
}

impl FakeCache {
    /// Reads or changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut CacheState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn called<T>(&self, request: &Request<T>) {
        let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        self.with(|s| s.authorizations.push(auth));
    }
}

struct Service {
    cache: Arc<FakeCache>,
    refuse: Option<(Code, String)>,
    sessions: mpsc::UnboundedSender<MasterSession>,
    kill: CancellationToken,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Service {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<WorkerMessage>>) -> Result<Response<SessionStream>, Status> {
        if let Some((code, message)) = &self.refuse {
            return Err(Status::new(*code, message.clone()));
        }
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (from_tx, from_worker) = mpsc::unbounded_channel();
        // Like a real master, end the session once the worker has closed its side.
        let ended = self.kill.child_token();
        let end = ended.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if from_tx.send(message).is_err() {
                    break;
                }
            }
            end.cancel();
        });
        let (to_worker, rx) = mpsc::channel(16);
        let _ = self.sessions.send(MasterSession { metadata, to_worker: Some(to_worker), from_worker, heartbeats: 0 });
        let stream = ReceiverStream::new(rx).map(Ok).take_until(ended.cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lookup(&self, request: Request<proto::CacheQuery>) -> Result<Response<proto::CacheAnswer>, Status> {
        self.cache.called(&request);
        let query = request.into_inner();
        let answer = self.cache.with(|s| {
            s.queries.push(query);
            s.lookup.clone()
        });
        match answer {
            Some(Ok(answer)) => Ok(Response::new(answer)),
            Some(Err(code)) => Err(Status::new(code, "the fake master says no")),
            None => Err(Status::unimplemented("no cache on this fake master")),
        }
    }

    async fn missing_blobs(&self, request: Request<proto::BlobList>) -> Result<Response<proto::BlobList>, Status> {
        self.cache.called(&request);
        let digests = request.into_inner().digests;
        let (hangs, missing) = self.cache.with(|s| {
            s.asked.push(digests.clone());
            (s.missing_hangs, digests.into_iter().filter(|d| !s.blobs.contains_key(d)).collect())
        });
        if hangs {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(proto::BlobList { digests: missing }))
    }

    type GetBlobStream = Pin<Box<dyn Stream<Item = Result<proto::BlobData, Status>> + Send>>;

    async fn get_blob(&self, request: Request<proto::BlobRef>) -> Result<Response<Self::GetBlobStream>, Status> {
        self.cache.called(&request);
        let digest = request.into_inner().digest;
        let (error, hangs, blob) = self.cache.with(|s| {
            s.fetched.push(digest.clone());
            (s.get_errors.get(&digest).copied(), s.get_hangs.contains(&digest), s.blobs.get(&digest).cloned())
        });
        if let Some(code) = error {
            return Err(Status::new(code, format!("the fake master cannot serve {digest}")));
        }
        if hangs {
            return Ok(Response::new(Box::pin(futures::stream::pending())));
        }
        let Some(blob) = blob else {
            return Err(Status::not_found(format!("no blob {digest}")));
        };
        let size = blob.len() as u64;
        let mut chunks: Vec<Result<proto::BlobData, Status>> = blob
            .chunks(1 << 20)
            .map(|c| Ok(proto::BlobData { digest: String::new(), size: 0, data: c.to_vec() }))
            .collect();
        match chunks.first_mut() {
            Some(Ok(first)) => {
                first.digest = digest;
                first.size = size;
            }
            _ => chunks.push(Ok(proto::BlobData { digest, size, data: Vec::new() })),
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn put_blob(
        &self,
        request: Request<Streaming<proto::BlobData>>,
    ) -> Result<Response<proto::BlobStored>, Status> {
        self.cache.called(&request);
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("an empty PutBlob"));
        };
        let (digest, size) = (first.digest.clone(), first.size);
        let mut data = first.data;
        while let Some(more) = stream.message().await? {
            data.extend_from_slice(&more.data);
        }
        if data.len() as u64 != size || rbb_worker::cache::sha256_of(&data) != digest {
            return Err(Status::data_loss(format!("{digest}: got {} bytes that do not match", data.len())));
        }
        let stored_bytes = data.len() as u64;
        self.cache.with(|s| {
            s.puts.push((digest.clone(), size));
            s.blobs.insert(digest, data);
        });
        Ok(Response::new(proto::BlobStored { stored_bytes }))
    }
}

impl FakeMaster {
    /// Serves on `addr` (port 0 for any), accepting every session.
    pub async fn start(addr: SocketAddr) -> FakeMaster {
        FakeMaster::start_with(addr, None).await
    }

    /// Serves on `addr`, refusing every session with `code`.
    pub async fn refusing(addr: SocketAddr, code: Code, message: &str) -> FakeMaster {
        FakeMaster::start_with(addr, Some((code, message.to_owned()))).await
    }

    async fn start_with(addr: SocketAddr, refuse: Option<(Code, String)>) -> FakeMaster {
        let listener = TcpListener::bind(addr).await.expect("bind the fake master");
        let addr = listener.local_addr().unwrap();
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let kill = CancellationToken::new();
        let stop = CancellationToken::new();
        let cache = Arc::new(FakeCache::default());
        let service = Service { cache: Arc::clone(&cache), refuse, sessions: sessions_tx, kill: kill.clone() };
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                tonic::transport::Server::builder()
                    .add_service(WorkerServer::new(service))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
                    .await
                    .expect("fake master server");
            }
        });
        FakeMaster { addr, cache, sessions, kill, stop, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next session a worker opens.
    pub async fn next_session(&mut self) -> MasterSession {
        tokio::time::timeout(RECV_LIMIT, self.sessions.recv())
            .await
            .expect("no worker session in time")
            .expect("server gone")
    }

    /// Ends all sessions and stops listening; returns the address for a restart.
    pub async fn stop(self) -> SocketAddr {
        self.kill.cancel();
        self.stop.cancel();
        let abort = self.server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.server).await.is_err() {
            abort.abort();
        }
        self.addr
    }
}

impl MasterSession {
    /// The next message that is not a heartbeat.
    pub async fn recv(&mut self) -> Msg {
        loop {
            let message = tokio::time::timeout(RECV_LIMIT, self.from_worker.recv())
                .await
                .expect("no message from the worker in time")
                .expect("the worker closed the stream");
            match message.msg.expect("empty WorkerMessage") {
                Msg::Heartbeat(_) => self.heartbeats += 1,
                msg => return msg,
            }
        }
    }

    /// The next message that is not a heartbeat, or `None` once the worker closed its side.
    pub async fn try_recv(&mut self) -> Option<Msg> {
        loop {
            let message = tokio::time::timeout(RECV_LIMIT, self.from_worker.recv())
                .await
                .expect("the worker neither sent nor closed in time")?;
            match message.msg.expect("empty WorkerMessage") {
                Msg::Heartbeat(_) => self.heartbeats += 1,
                msg => return Some(msg),
            }
        }
    }

    /// Whether the worker's side of the stream is closed (draining what is left).
    pub async fn closed(&mut self) -> bool {
        while let Ok(next) = tokio::time::timeout(RECV_LIMIT, self.from_worker.recv()).await {
            if next.is_none() {
                return true;
            }
        }
        false
    }

    pub async fn send(&self, msg: MasterMsg) {
        let to_worker = self.to_worker.as_ref().expect("the session was hung up");
        to_worker.send(MasterMessage { msg: Some(msg) }).await.expect("session stream closed");
    }

    /// Ends the master's side of the session (the worker sees the stream end) while still
    /// reading what the worker sends.
    pub fn hang_up(&mut self) {
        self.to_worker = None;
    }

    /// Reads Hello and answers Welcome.
    pub async fn handshake(&mut self, heartbeat_interval_ms: u32) -> Hello {
        let hello = match self.recv().await {
            Msg::Hello(hello) => hello,
            other => panic!("expected Hello first, got {other:?}"),
        };
        self.send(MasterMsg::Welcome(Welcome {
            heartbeat_interval_ms,
            master_version: "test".to_owned(),
            labels: vec!["from-master".to_owned()],
        }))
        .await;
        hello
    }

    /// Messages up to and including the StepFinished of `lease` (others are kept too).
    pub async fn until_finished(&mut self, lease: u64) -> (Vec<Msg>, StepFinished) {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Msg::Finished(finished) if finished.lease == lease => return (seen, finished),
                msg => seen.push(msg),
            }
        }
    }
}
