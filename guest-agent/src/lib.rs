//! hostbind-agent: the guest agent.
//!
//! It keeps one connection to the host proxy (AF_VSOCK in production, a Unix socket for the
//! demo and tests), reconnects with backoff and re-runs Hello after every reconnect, re-acquires
//! its leases when the VM moved to another host, renews them at half their TTL, and serves apps
//! a local HTTP/1.1 + JSON API on a Unix socket (see docs/agent-api.yaml). Apps use the
//! `hostbind-client` library, which also defines the API's JSON types.

pub mod agent;
pub mod backoff;
pub mod chain;
mod conn;
mod leases;
pub mod procwatch;
pub mod requests;
mod server;
pub mod transport;

pub use agent::{run, Agent, AgentConfig, AgentError, Timing, AGENT_VERSION};
pub use transport::HostAddr;
