//! hostbind-proxy library: TPM access, enrollment, ledger and server.
pub mod tpm;
pub mod config;
pub mod enroll;
pub mod tpm_service;
// Lead: enabled when ledger.rs lands
// pub mod service;
// pub mod server;
// pub mod admin;
// pub mod vsock;
// pub mod daemon;
