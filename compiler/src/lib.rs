//! The rbb compiler: every repository's `.rbb/pipeline.yaml` in, one plan (a DAG of builders
//! and steps) and a list of diagnostics out.
//!
//! The core ([`compile`]) is pure: it reads no files and talks to no network. Sources come
//! from [`git`] (or from memory in tests), Python snippets go through the
//! [`snippet::Evaluator`] the caller passes in. A user's mistake is never a panic or an
//! `Err`: it is a [`Diagnostic`] with file:line:col, and compilation carries on to find the
//! next one.

pub mod condition;
pub mod cron;
pub mod diagnostic;
pub mod duration;
pub mod snippet;
pub mod spans;

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
