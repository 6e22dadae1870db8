//! Emulators and the local sandbox for kiam's tests; not part of the product binary.
//!
//! # Layout
//! - [`apiserver`]: an in-memory Kubernetes API server (pods, namespaces, nodes, events,
//!   service accounts) over plain HTTP, with fault injection for tests; it issues and
//!   reviews bound service-account tokens (TokenRequest, TokenReview, OIDC discovery);
//!   `kubectl` works against it.
//! - [`imds`]: the node's own EC2 metadata service, with a node role that must never
//!   reach a Pod.
//! - [`netns`]: a node and Pods made of network namespaces and veth pairs (root).
//! - [`procs`]: child processes: the sandbox's (logged, watched, die with it), the
//!   tests' and benchmarks' (one guard each), moto, and `kiam` command lines.
//! - [`sandbox`]: the local sandbox cluster (real `kiam server` and `kiam agent` processes)
//!   behind the `kiam-sandbox` binary and the end-to-end tests.
//! - [`sts`]: a built-in STS (AssumeRole, GetCallerIdentity) for when moto is missing.

pub mod apiserver;
pub mod imds;
pub mod netns;
pub mod procs;
pub mod sandbox;
pub mod sts;
