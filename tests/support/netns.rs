//! A node with Pods made of Linux network namespaces and veth pairs, for
//! tests that need real packets to go through iptables. Root only: without
//! root every constructor prints `SKIPPED: ...` and returns `None`.
//!
//! One implementation serves these tests and the sandbox: see
//! `kiam_sandbox::netns` for the shared and isolated kinds of node, the
//! addressing and the clean-up of crashed runs.

#![allow(unused_imports)]

pub use kiam_sandbox::netns::{Entered, Footprint, Node, Pod, METADATA_URL};
