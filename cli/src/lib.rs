//! hostbind-cli: what hostbind's three binaries share on the command line: man pages and shell
//! completions generated from their clap definitions ([`docs`]) and log output fit for a
//! terminal or for journald ([`logging`]).

pub mod docs;
pub mod logging;
