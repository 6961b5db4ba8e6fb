//! A standby master's HTTP port (docs/postgres.md): while another master holds the state,
//! the standby's API and UI are the active master's. Each connection is forwarded, bytes both
//! ways, to the address the active master recorded in the state (`Store::active_http`), so
//! everything it serves works through a standby as it does directly: lists, logs with
//! `Range`, the live event stream, control actions with their tokens. When the standby takes
//! over, the forwarder stops and the same address serves the standby's own API.

use crate::store::Store;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection accepted on `listener` until `stop`; answers 503 while no
/// active master is known or reachable.
pub async fn forward(listener: TcpListener, state: Arc<Store>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((mut client, peer)) = accepted else { continue };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let active = tokio::task::spawn_blocking(move || state.active_http()).await;
            let target = match active {
                Ok(Ok(Some(addr))) => addr,
                Ok(Ok(None)) => return unavailable(&mut client, "no active master has recorded its address yet").await,
                Ok(Err(e)) => return unavailable(&mut client, &format!("cannot read the state: {e}")).await,
                Err(e) => return unavailable(&mut client, &e.to_string()).await,
            };
            let mut upstream = match TcpStream::connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, active = %target, error = %e, "standby: the active master does not answer");
                    return unavailable(&mut client, &format!("the active master at {target} does not answer: {e}"))
                        .await;
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

/// A plain 503 in the API's error shape.
async fn unavailable(client: &mut TcpStream, why: &str) {
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
