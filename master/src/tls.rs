//! TLS for the master's two ports (rustls): loads the certificate, key and client CA named by
//! the config, runs the handshakes off the accept loop (a refused handshake is logged with
//! the peer's address and the reason), and hands finished connections to tonic and axum. It
//! knows nothing of workers or tokens: what a client certificate names is given to the gRPC
//! service ([`PeerInfo`]), which decides.

use anyhow::{Context, Result};
use rbb_schema::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a client gets to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of both ports.
#[derive(Clone)]
pub struct ServerTls {
    /// For the gRPC port: asks for a client certificate when `client_ca` is set (optional at
    /// the handshake; the worker's config decides whether it must have one).
    pub grpc: Arc<rustls::ServerConfig>,
    /// For the HTTP port: people and scripts, no client certificate.
    pub http: Arc<rustls::ServerConfig>,
    /// Whether every worker must present a client certificate.
    pub require_client_cert: bool,
    /// Whether a client CA is configured (client certificates can be checked at all).
    pub client_ca: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", path.display());
    }
    Ok(certs)
}

impl ServerTls {
    /// Loads the files named by `cfg`, relative to `base` (the config's directory).
    pub fn load(cfg: &TlsConfig, base: &Path) -> Result<ServerTls> {
        let cert_path = base.join(&cfg.cert);
        let key_path = base.join(&cfg.key);
        let certs = load_certs(&cert_path).context("tls.cert")?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("tls.key: reading a PEM private key from {}", key_path.display()))?;
        let builder = || {
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")
        };
        let client_verifier = match &cfg.client_ca {
            Some(ca) => {
                let path = base.join(ca);
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(&path).context("tls.client_ca")? {
                    roots.add(c).with_context(|| format!("tls.client_ca: a certificate in {}", path.display()))?;
                }
                Some(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .context("tls.client_ca")?,
                )
            }
            None if cfg.require_client_cert => {
                anyhow::bail!(
                    "tls.require_client_cert needs tls.client_ca: the CA that signs the workers' certificates"
                )
            }
            None => None,
        };
        let mut grpc = match client_verifier {
            Some(v) => builder()?.with_client_cert_verifier(v),
            None => builder()?.with_no_client_auth(),
        }
        .with_single_cert(certs.clone(), key.clone_key())
        .with_context(|| {
            format!("tls.cert and tls.key: {} and {} do not match", cert_path.display(), key_path.display())
        })?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        let mut http = builder()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(|| format!("tls.cert and tls.key: {} and {}", cert_path.display(), key_path.display()))?;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            grpc: Arc::new(grpc),
            http: Arc::new(http),
            require_client_cert: cfg.require_client_cert,
            client_ca: cfg.client_ca.is_some(),
        })
    }
}

/// Who is at the other end of a TLS connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The verified client certificate's subject names (common names and DNS names), if the
    /// client presented one.
    pub cert_names: Option<Vec<String>>,
}

/// A connection whose handshake is done.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// The subject names of a DER certificate: its common names and DNS names.
pub fn subject_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_owned)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names.dedup();
    names.sort();
    names.dedup();
    names
}

/// Why a handshake failed, in words an operator can act on.
pub fn handshake_reason(err: &io::Error) -> String {
    use rustls::{CertificateError, Error as E};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => "the client closed the connection during the handshake".into(),
            _ => err.to_string(),
        };
    };
    match tls {
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the client does not speak TLS (plain text on a TLS port?)".into()
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the client certificate's issuer is not tls.client_ca (unknown issuer)".into()
        }
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the client certificate has expired".into()
        }
        E::InvalidCertificate(other) => format!("bad client certificate: {other:?}"),
        E::AlertReceived(alert) => format!("the client refused this master's certificate ({alert:?})"),
        E::NoCertificatesPresented => "the client presented no certificate".into(),
        other => other.to_string(),
    }
}

/// Accepts TCP connections on `listener` and runs each handshake in its own task; finished
/// connections come out of the returned channel. A refused handshake is logged (warn) with
/// the peer's address and the reason. Stops with `stop`.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    port: &'static str,
    stop: CancellationToken,
) -> mpsc::Receiver<TlsConn> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!(port, error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(port, peer = %addr, reason = %handshake_reason(&e), "refused a TLS connection");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(port, peer = %addr, reason = "no handshake within 10 s", "refused a TLS connection");
                        return;
                    }
                };
                let cert_names =
                    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| subject_names(c.as_ref()));
                let _ = tx.send(TlsConn { stream, info: PeerInfo { addr, cert_names } }).await;
            });
        }
    });
    rx
}

/// The HTTP port's TLS listener for axum.
pub struct HttpsListener {
    pub incoming: mpsc::Receiver<TlsConn>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        match self.incoming.recv().await {
            Some(conn) => {
                let addr = conn.info.addr;
                (conn, addr)
            }
            // The accept loop stopped: the server is shutting down.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
