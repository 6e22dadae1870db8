//! Emulators and the local sandbox for kiam's tests; not part of the product binary.
//!
//! # Layout
//! - [`apiserver`]: an in-memory Kubernetes API server (pods, namespaces, events) over
//!   plain HTTP, with fault injection for tests; `kubectl` works against it.

pub mod apiserver;
pub mod netns;
pub mod procs;
pub mod imds;
pub mod sandbox;
pub mod sts;
