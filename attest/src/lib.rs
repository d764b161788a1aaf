//! hostbind-attest: the I/O-free core shared by the proxy, the agent and the issuer.
//!
//! Wire protocol, signed objects (host certificates, licenses, tokens) as COSE_Sign1,
//! TPM evidence parsing and verification, and the one-call token verifier apps use.
//!
//! With the default `std` feature off the crate is `no_std` + `alloc` and holds what a guest
//! without an OS needs: [`wire`] (frames and messages), [`verify`] with [`token`], [`signed`],
//! [`tpm`], [`merkle`] and [`keys`] (see baremetal-guest/). Generating keys still calls the
//! operating system's random number generator (through ring), so only verification is for
//! guests without one.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

#[cfg(feature = "std")]
pub mod chain;
#[cfg(feature = "std")]
pub mod credential;
#[cfg(feature = "std")]
pub mod ek;
#[cfg(feature = "std")]
pub mod enroll;
#[cfg(feature = "std")]
pub mod files;
pub mod keys;
pub mod merkle;
pub mod signed;
pub mod token;
pub mod tpm;
#[cfg(feature = "std")]
pub mod usage;
/// The compact body form of the usage log under its older path (it lives in `usage/body.rs`).
#[cfg(feature = "std")]
pub use usage::body as usage_body;
pub mod verify;
pub mod wire;
