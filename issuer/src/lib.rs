//! hostbind-issuer library: turns hostbind files into readable descriptions for the CLI.

pub mod describe;
