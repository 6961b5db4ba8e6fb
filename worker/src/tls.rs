//! The worker's side of TLS: verifies the master against `--ca-file` (and presents a client
//! certificate when given one) on the gRPC connection, and says in plain words why a master
//! was refused: unknown issuer, expired, wrong name. It dials and handshakes; the session
//! decides what a refusal means.

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::transport::Uri;

type Stream = TokioIo<Prefixed>;

/// The files a worker verifies its master with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificates (PEM) the master's certificate must chain to.
    pub ca_file: PathBuf,
    /// A client certificate chain and its key (PEM), for a master that requires one.
    pub client: Option<(PathBuf, PathBuf)>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The rustls client config: roots from the CA file, ALPN `h2`, the client certificate if any.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&files.ca_file)? {
        roots.add(c).map_err(|e| format!("{}: {e}", files.ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match &files.client {
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read a PEM private key from {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{} and {}: {e}", cert.display(), key_path(&files.client)))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn key_path(client: &Option<(PathBuf, PathBuf)>) -> String {
    client.as_ref().map(|(_, k)| k.display().to_string()).unwrap_or_default()
}

/// Why a handshake with the master failed, when it is about certificates (retrying cannot
/// help); `None` for anything else (a network error is retried).
pub fn refusal(err: &io::Error, host: &str) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let tls = err.get_ref().and_then(|e| e.downcast_ref::<E>())?;
    Some(match tls {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the master's certificate does not verify: unknown issuer (it is not signed by --ca-file)".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the master's certificate does not verify: expired".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the master's certificate does not verify: not valid yet (check the clocks)".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("the master's certificate does not verify: wrong name (it is not valid for `{host}`)")
        }
        E::InvalidCertificate(other) => format!("the master's certificate does not verify: {other:?}"),
        E::AlertReceived(a @ (A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateExpired)) => {
            format!("the master refused this worker's client certificate ({a:?}); see --cert and --key")
        }
        _ => return None,
    })
}

/// Dials the master and runs the TLS handshake; a certificate refusal is also kept in
/// `refused` for the session to report.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    pub refused: Arc<Mutex<Option<String>>>,
}

impl Connector {
    pub fn new(config: Arc<rustls::ClientConfig>) -> Connector {
        Connector { config, refused: Arc::default() }
    }

    async fn connect(self, uri: Uri) -> io::Result<Stream> {
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.clone())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("`{host}` is not a host name")))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let _ = tcp.set_nodelay(true);
        match tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await {
            Ok(stream) if self.config.client_auth_cert_resolver.has_certs() => {
                // With TLS 1.3 the master checks a client certificate after the worker's
                // handshake is done: its verdict is the first record it sends. Read it now,
                // so a refusal is a refusal and not a lost stream.
                let mut stream = Prefixed { head: Vec::new(), at: 0, inner: stream };
                let mut first = [0u8; 512];
                let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    use tokio::io::AsyncReadExt;
                    stream.inner.read(&mut first).await
                })
                .await;
                match read {
                    Ok(Ok(n)) if n > 0 => {
                        stream.head = first[..n].to_vec();
                        Ok(TokioIo::new(stream))
                    }
                    Ok(Err(err)) => match refusal(&err, &host) {
                        Some(why) => {
                            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                            Err(io::Error::new(io::ErrorKind::PermissionDenied, why))
                        }
                        None => Err(err),
                    },
                    Ok(Ok(_)) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the master closed the connection")),
                    Err(_) => {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "the master sent nothing after the handshake"))
                    }
                }
            }
            Ok(stream) => Ok(TokioIo::new(Prefixed { head: Vec::new(), at: 0, inner: stream })),
            Err(err) => {
                if let Some(why) = refusal(&err, &host) {
                    *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
                }
                Err(err)
            }
        }
    }
}

/// The service tonic connects through.
impl tower::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// Whether the server at `addr` (`host:port`, maybe with a path) answers an HTTP/2 preface
/// with a TLS record (an alert): it wants TLS.
pub async fn speaks_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host_port = addr.split('/').next().unwrap_or(addr);
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(host_port).await.ok()?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut head = [0u8; 3];
        tcp.read_exact(&mut head).await.ok()?;
        // A TLS record: content type alert (21) or handshake (22), version 3.x.
        Some(matches!(head, [21 | 22, 3, _]))
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), probe).await.ok().flatten().unwrap_or(false)
}

/// A TLS stream whose first bytes were already read: they are read again first.
pub struct Prefixed {
    head: Vec<u8>,
    at: usize,
    inner: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
