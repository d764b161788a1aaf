//! Test harness pieces for hostbind.
