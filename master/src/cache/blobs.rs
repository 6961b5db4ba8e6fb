//! Content-addressed blobs of step outputs under `<state dir>/cache/blobs`.
