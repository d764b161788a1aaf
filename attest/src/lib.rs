//! hostbind-attest: the I/O-free core shared by the proxy, the agent and the issuer.
//!
//! Wire protocol, signed objects (host certificates, licenses, tokens) as COSE_Sign1,
//! TPM evidence parsing and verification, and the one-call token verifier apps use.

pub mod chain;
pub mod credential;
pub mod ek;
pub mod enroll;
pub mod files;
pub mod keys;
pub mod merkle;
pub mod signed;
pub mod token;
pub mod tpm;
pub mod usage;
pub mod usage_body;
pub mod verify;
pub mod wire;
