//! hostbind-proxy library: TPM access, enrollment, ledger and server.
