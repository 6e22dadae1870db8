//! `kiam server`: answers agents over gRPC/mTLS only after the Pod and
//! Namespace caches have completed their first full sync.
//!
//! Data flow: the Pod watcher ([`pods`]) keeps a small projection of each Pod
//! indexed by IP and by role identity and tells the prefetcher when a Pod with
//! a role appears; [`credentials`] fetches through [`sts`] with one call in
//! flight per identity; [`grpc`] answers agents by combining [`pods`],
//! [`namespaces`] and [`policy`], and records [`events`] on the Pod.

pub mod config;
pub mod credentials;
pub mod events;
pub mod grpc;
pub mod namespaces;
pub mod pods;
pub mod policy;
pub mod sts;
