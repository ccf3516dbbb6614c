//! Kubernetes test double.
