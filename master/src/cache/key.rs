//! The full cache key of a step (docs/cache-key.md): its manifest, canonical encoding and
//! hash, the git ids of its inputs, and what differs between two manifests.
