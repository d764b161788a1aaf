//! hostbind-proxy library: TPM access, enrollment, ledger and server.
pub mod admin;
pub mod clock;
pub mod clones;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod fresh;
pub mod ledger;
pub mod libvirt;
pub mod metrics;
pub mod server;
pub mod service;
pub mod tpm;
pub mod tpm_service;
pub mod usage;
pub mod usage_spill;
pub mod vsock;
