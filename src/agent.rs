//! TODO
pub mod iptables;
