//! The blob calls of the worker protocol (`MissingBlobs`, `GetBlob`, `PutBlob`): the gRPC
//! service checks the caller, then hands them here. File work runs on the blocking pool and
//! a blob streams through a short channel in pieces of at most 1 MiB, so a blob is never
//! whole in memory. Which blobs an entry needs, and whether a step may be reused, is not
//! decided here.

use super::blobs::{BlobError, valid_digest};
use crate::engine::Engine;
use rbb_schema::proto::{BlobData, BlobList, BlobStored};
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::Status;

/// Most digests one `MissingBlobs` may ask about.
pub const MAX_DIGESTS: usize = 100_000;

/// Pieces in flight between the network and the file.
const DEPTH: usize = 4;

fn status(e: BlobError) -> Status {
    match e {
        BlobError::BadDigest(_) | BlobError::Size { .. } | BlobError::Mismatch { .. } => {
            Status::invalid_argument(e.to_string())
        }
        BlobError::NotFound { .. } => Status::not_found(e.to_string()),
        BlobError::DataLoss { .. } => Status::data_loss(e.to_string()),
        BlobError::Io { .. } => {
            tracing::error!(error = %e, "step cache blob");
            Status::internal("the master cannot read or write the blob; see its log")
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "{what}");
    Status::internal(format!("{what}; see the master's log"))
}

fn check(digest: &str) -> Result<(), Status> {
    if valid_digest(digest) { Ok(()) } else { Err(status(BlobError::BadDigest(digest.to_owned()))) }
}

/// The digests of `list` the worker must upload, in the order asked, each once: those with
/// no file, no row, or only an unused upload old enough to be collected before the step's
/// entry is stored (see [`crate::store::Store::cache_blobs_known`]).
pub async fn missing_blobs(engine: Arc<Engine>, list: BlobList) -> Result<BlobList, Status> {
    if list.digests.len() > MAX_DIGESTS {
        return Err(Status::invalid_argument(format!(
            "{} digests asked at once; at most {MAX_DIGESTS}",
            list.digests.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut digests = Vec::with_capacity(list.digests.len());
    for d in list.digests {
        check(&d)?;
        if seen.insert(d.clone()) {
            digests.push(d);
        }
    }
    tokio::task::spawn_blocking(move || {
        let known = engine.store().cache_blobs_known(&digests).map_err(|e| internal("cannot read blob rows", e))?;
        let missing = digests.into_iter().zip(known).filter(|(d, k)| !k || !engine.blobs().has(d)).map(|(d, _)| d);
        Ok(BlobList { digests: missing.collect() })
    })
    .await
    .map_err(|e| internal("the blob lookup failed", e))?
}

/// The blob's content, streamed: the first piece names the digest (and the size the file
/// declares). NOT_FOUND when the master has no file; DATA_LOSS, as the stream's last item,
/// when the content does not match its digest (the file is then removed).
pub async fn get_blob(
    engine: Arc<Engine>,
    digest: String,
) -> Result<impl Stream<Item = Result<BlobData, Status>> + Send + 'static, Status> {
    check(&digest)?;
    let d = digest.clone();
    let e = engine.clone();
    let reader = tokio::task::spawn_blocking(move || e.blobs().reader(&d))
        .await
        .map_err(|e| internal("the blob read failed", e))?
        .map_err(status)?;
    let (tx, rx) = tokio::sync::mpsc::channel(DEPTH);
    tokio::task::spawn_blocking(move || {
        let size = reader.size().unwrap_or(0);
        let mut first = true;
        for piece in reader {
            let item = piece.map(|data| BlobData {
                digest: if first { digest.clone() } else { String::new() },
                size: if first { size } else { 0 },
                data,
            });
            first = false;
            let failed = item.is_err();
            // A receiver gone is a worker that stopped reading: stop too.
            if tx.blocking_send(item.map_err(status)).is_err() || failed {
                return;
            }
        }
        if first {
            let _ = tx.blocking_send(Ok(BlobData { digest, size: 0, data: Vec::new() }));
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// What the network side hands the writer.
enum Piece {
    Data(Vec<u8>),
    /// The stream ended: finish the blob.
    End,
}

/// Stores an uploaded blob: checks the digest, streams the pieces into a [`BlobWriter`]
/// (size and digest verified before the file is renamed into place), then records the
/// blob's row durably. An upload that stops short, fails or is dropped leaves nothing.
///
/// [`BlobWriter`]: super::blobs::BlobWriter
pub async fn put_blob(
    engine: Arc<Engine>,
    mut stream: impl Stream<Item = Result<BlobData, Status>> + Unpin,
) -> Result<BlobStored, Status> {
    let first = match stream.next().await {
        Some(Ok(m)) => m,
        Some(Err(s)) => return Err(s),
        None => return Err(Status::invalid_argument("an empty PutBlob stream: the first message names the blob")),
    };
    let digest = first.digest.clone();
    check(&digest)?;
    let limit = engine.cache_limit();
    if first.size > limit {
        return Err(Status::resource_exhausted(format!(
            "blob {digest} has {} bytes, more than the cache's max_size ({limit} bytes)",
            first.size
        )));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(DEPTH);
    let (d, size, e) = (digest.clone(), first.size, engine.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = e.blobs().writer(&d, size).map_err(status)?;
        loop {
            match rx.blocking_recv() {
                Some(Piece::Data(data)) => w.write(&data).map_err(status)?,
                Some(Piece::End) => break,
                // The upload was abandoned: dropping the writer removes its file.
                None => return Err(Status::cancelled("the upload stopped before its end")),
            }
        }
        let stored = w.finish().map_err(status)?;
        e.store().cache_put_blob(&d, stored).map_err(|err| internal("cannot record a blob", err))?;
        Ok(BlobStored { stored_bytes: stored })
    });
    let mut next = Some(Ok(first));
    let sent = async {
        while let Some(m) = next.take() {
            let m = m?;
            if !m.digest.is_empty() && m.digest != digest {
                return Err(Status::invalid_argument(format!(
                    "a PutBlob stream of {digest} names {} mid-way",
                    m.digest
                )));
            }
            if tx.send(Piece::Data(m.data)).await.is_err() {
                // The writer stopped (its error is the answer).
                return Ok(());
            }
            next = stream.next().await;
        }
        let _ = tx.send(Piece::End).await;
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(|e| internal("the blob write failed", e))?;
    sent?;
    let stored = written?;
    tracing::debug!(blob = %digest, size, stored = stored.stored_bytes, "blob stored");
    Ok(stored)
}
