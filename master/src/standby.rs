//! A standby master's ports (docs/postgres.md): while another master holds the state, the
//! standby's API, UI and worker port are the active master's. Each connection is forwarded,
//! bytes both ways, to the address the active master recorded in the state
//! (`Store::active`), so everything works through a standby as it does directly: lists, logs
//! with `Range`, the live event stream, control actions with their tokens, worker sessions
//! (TLS included, end to end). When the standby takes over, the forwarders stop and the same
//! addresses serve the standby's own API and workers.

use crate::store::Store;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection accepted on `listener` to the active master's `port` (`http` or
/// `grpc`) until `stop`. While no active master is known or reachable, an HTTP client gets a
/// 503 and a worker a closed connection (it tries again).
pub async fn forward(listener: TcpListener, port: &'static str, state: Arc<Store>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((mut client, peer)) = accepted else { continue };
        let _ = client.set_nodelay(true);
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let active = tokio::task::spawn_blocking(move || state.active(port)).await;
            let target = match active {
                Ok(Ok(Some(addr))) => addr,
                Ok(Ok(None)) => {
                    return unavailable(&mut client, port, "no active master has recorded its address yet").await;
                }
                Ok(Err(e)) => return unavailable(&mut client, port, &format!("cannot read the state: {e}")).await,
                Err(e) => return unavailable(&mut client, port, &e.to_string()).await,
            };
            let mut upstream = match TcpStream::connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, active = %target, error = %e, "standby: the active master does not answer");
                    let why = format!("the active master at {target} does not answer: {e}");
                    return unavailable(&mut client, port, &why).await;
                }
            };
            let _ = upstream.set_nodelay(true);
            // A stream (the live events) ends when the active master goes or this one takes over.
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// A plain 503 in the API's error shape (a worker's connection is just closed).
async fn unavailable(client: &mut TcpStream, port: &str, why: &str) {
    if port != "http" {
        tracing::warn!(%why, "standby: a worker connection cannot be forwarded");
        let _ = client.shutdown().await;
        return;
    }
    let body = serde_json::json!({
        "error": {
            "code": "standby",
            "message": format!("this master is a standby and cannot reach the active one: {why}"),
        }
    })
    .to_string();
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(reply.as_bytes()).await;
    let _ = client.shutdown().await;
}
