//! The rbb worker: connects to a master over gRPC and runs the steps it leases.
//!
//! - [`session`]: the connection loop (Hello, heartbeats, leases, cancels, reconnects).
//! - [`cache`]: the step cache's worker side (outputs, the local blob store, restores, uploads).
//! - [`checkout`]: making a build's checkout directory a clean checkout of one commit.
//! - [`executor`]: the [`Executor`] trait and the native (`sh -c`) executor.
//! - [`docker`]: the Docker executor (steps in containers) and the sweep of a crashed run's leftovers.
//! - [`guard`]: the guard process that kills a dead worker's steps, and the restart sweep.
//! - [`mask`]: secrets in a step's output become `***` before the output leaves the worker.
//! - [`tls`]: verifying the master's certificate (and presenting the worker's) over TLS.
//!
//! This crate knows only `rbb-schema`; it never touches the master's store or web API, and
//! never exits the process (only `main.rs` maps errors to exit codes).

pub mod cache;
pub mod checkout;
pub mod docker;
pub mod executor;
pub mod guard;
pub mod mask;
pub mod session;
pub mod tls;

pub use docker::DockerExecutor;
pub use executor::{
    ContainerOptions, Executor, HealthSpec, MountSpec, NativeExecutor, Output, ServiceSpec, StepOutcome, StepSpec,
};
pub use session::{WorkerConfig, WorkerError, run, run_with_executor};
