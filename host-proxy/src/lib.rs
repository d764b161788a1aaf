//! hostbind-proxy library: TPM access, enrollment, ledger and server.
pub mod tpm;
pub mod config;
pub mod enroll;
pub mod ledger;
pub mod tpm_service;
pub mod service;
pub mod server;
pub mod admin;
pub mod vsock;
pub mod daemon;
