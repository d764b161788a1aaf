//! hostbind-proxy library: TPM access, enrollment, ledger and server.
pub mod tpm;
pub mod config;
