//! The rbb master: runs the compiled plan on workers.
//!
//! [`server`] wires the parts: the [`engine`] (builds, steps, workers; the only place state
//! changes), the [`store`] (redb) and [`logs`] (append-only files) beneath it, the gRPC
//! service for workers ([`grpc`]) and the REST API ([`http`]) above it. Only this crate
//! touches redb, axum and the gRPC server.

pub mod audit;
pub mod auth;
pub mod cache;
pub mod engine;
pub mod forge;
pub mod git_http;
pub mod grpc;
pub mod http;
pub mod live;
pub mod logs;
pub mod mirror;
pub mod model;
pub mod openapi;
pub mod planner;
pub mod query;
pub mod ratelimit;
pub mod secrets;
pub mod server;
pub mod sources;
pub mod standby;
pub mod store;
pub mod tls;
pub mod ui;
pub mod webhooks;
