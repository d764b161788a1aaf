//! hostbind-agent: the guest agent.
//!
//! It keeps one connection to the host proxy (AF_VSOCK in production, a Unix socket for the
//! demo and tests), reconnects with backoff and re-runs Hello after every reconnect, re-acquires
//! its leases when the VM moved to another host, renews them at half their TTL, and serves apps
//! a local HTTP/1.1 + JSON API on a Unix socket (see docs/agent-api.yaml). Apps use the
//! `hostbind-client` library, which also defines the API's JSON types.

//!
//! Modules, top down (imports only go downward): `agent` starts the tasks; `conn` (the
//! connection to the proxy), `server` (the local API) and `leases` (the lease manager) run
//! them; `shared` is the state they share, `session` the session events `conn` publishes for
//! `leases`, `call` a request to the proxy, `lease` the lease data; `config`, `chain`,
//! `statefile`, `transport`, `procwatch`, `backoff` and `requests` are leaves.

pub mod agent;
pub mod backoff;
mod call;
pub mod chain;
mod config;
mod conn;
mod lease;
mod leases;
pub mod procwatch;
pub mod requests;
mod server;
mod session;
mod shared;
mod statefile;
pub mod transport;

pub use agent::{run, Agent, AgentConfig, AgentError, Timing, AGENT_VERSION};
pub use transport::HostAddr;
