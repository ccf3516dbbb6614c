//! Conveyor's wire protocol and the clients built on it.
//!
//! This crate is the single owner of the protocol: stream, subject and consumer names, the
//! headers a job carries, and the settings the operator hands to worker pods. The operator,
//! the worker runtime and the CLI all use it; nothing here depends on Kubernetes.

pub mod names;
