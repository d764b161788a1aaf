//! hostbind-issuer library: the vendor-side operations behind the CLI.
