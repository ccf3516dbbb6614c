//! Conveyor's wire protocol and the clients built on it.
//!
//! This crate is the single owner of the protocol: stream, subject and consumer names
//! ([`names`]), the headers a job carries ([`protocol`]), the JetStream assets behind a queue
//! ([`admin`]), the producer [`Client`] and the Rust worker SDK ([`worker`]). The operator, the
//! worker runtime and the CLI all use it; nothing here depends on Kubernetes.

pub mod admin;
pub mod client;
pub mod connect;
pub mod dlq;
pub mod flow;
pub mod jwt;
pub mod names;
pub mod peek;
pub mod permissions;
pub mod protocol;
mod pull;
pub mod rate;
pub mod schedule;
pub mod stored;
pub mod worker;
pub mod workflow;

pub use client::{
    CancelAck, CancelError, Client, Job, JobResult, SubmitAck, SubmitError, WaitError,
};
pub use worker::{Outcome, ReceivedJob, Worker};
