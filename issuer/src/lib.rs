//! hostbind-issuer library: turns hostbind files into readable descriptions and usage reports
//! for the CLI.

pub mod describe;
pub mod registry;
pub mod report;
