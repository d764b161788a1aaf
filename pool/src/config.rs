//! `[pool]` settings: how a node reaches the customer's etcd cluster and which pools it takes
//! part in. The proxy's configuration embeds this struct (the keys are documented in its key
//! table and packaging/proxy.toml).

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;
use std::time::Duration;

/// Errors of the pool configuration.
#[derive(Debug, thiserror::Error)]
pub enum PoolConfigError {
    /// An inconsistent or missing setting.
    #[error("[pool] {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A certificate or key file cannot be read.
    #[error("[pool] {key}: cannot read {path}: {source}; check the path and that the proxy's user may read it")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn de_dur<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        de::Error::custom(format!(
            "invalid duration '{s}' ({e}); write e.g. \"2s\" or \"500ms\""
        ))
    })
}

fn ser_dur<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// The `[pool]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// etcd client URLs, `https://host:port` each (TLS only).
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) the etcd members' server certificates chain to.
    pub ca: PathBuf,
    /// This node's client certificate (PEM), signed by a CA the members trust
    /// (`--trusted-ca-file`).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Pool ids this node takes part in; a pool license for another pool is refused.
    pub pools: Vec<String>,
    /// Deadline of one etcd request; past it the pool counts as unavailable.
    #[serde(
        default = "PoolConfig::default_request_timeout",
        deserialize_with = "de_dur",
        serialize_with = "ser_dur"
    )]
    pub request_timeout: Duration,
    /// Deadline of connecting to a member.
    #[serde(
        default = "PoolConfig::default_connect_timeout",
        deserialize_with = "de_dur",
        serialize_with = "ser_dur"
    )]
    pub connect_timeout: Duration,
    /// How often the node keeps its etcd leases alive and reconciles after an outage (at most
    /// a third of the shortest seat TTL is used in any case). Seats re-homed away are seen by
    /// a watch at once, not at this interval.
    #[serde(
        default = "PoolConfig::default_check_interval",
        deserialize_with = "de_dur",
        serialize_with = "ser_dur"
    )]
    pub check_interval: Duration,
}

impl PoolConfig {
    fn default_request_timeout() -> Duration {
        Duration::from_secs(2)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    fn default_check_interval() -> Duration {
        Duration::from_secs(1)
    }

    /// A configuration with the default timeouts.
    pub fn new(
        endpoints: Vec<String>,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        pools: Vec<String>,
    ) -> PoolConfig {
        PoolConfig {
            endpoints,
            ca,
            cert,
            key,
            pools,
            request_timeout: Self::default_request_timeout(),
            connect_timeout: Self::default_connect_timeout(),
            check_interval: Self::default_check_interval(),
        }
    }

    /// Checks the settings without touching files or the network.
    pub fn validate(&self) -> Result<(), PoolConfigError> {
        let bad = |key, reason: String| Err(PoolConfigError::Invalid { key, reason });
        if self.endpoints.is_empty() {
            return bad("endpoints", "name at least one etcd member (\"https://host:2379\"); three or more for a cluster that survives the loss of one".into());
        }
        for e in &self.endpoints {
            if !e.starts_with("https://") {
                return bad(
                    "endpoints",
                    format!("'{e}' is not an https:// URL; etcd traffic of a seat pool must use TLS with client certificates"),
                );
            }
        }
        for p in &self.pools {
            if let Err(e) = hostbind_attest::signed::check_identifier("pool id", p) {
                return bad("pools", e.to_string());
            }
        }
        for (key, d, min) in [
            (
                "request_timeout",
                self.request_timeout,
                Duration::from_millis(50),
            ),
            (
                "connect_timeout",
                self.connect_timeout,
                Duration::from_millis(50),
            ),
            (
                "check_interval",
                self.check_interval,
                Duration::from_millis(100),
            ),
        ] {
            if d < min || d > Duration::from_secs(60) {
                return bad(
                    key,
                    format!(
                        "{} is outside {} to 60s",
                        humantime::format_duration(d),
                        humantime::format_duration(min)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Reads the CA, certificate and key (async file reads, off the runtime's workers).
    pub(crate) async fn tls(&self) -> Result<etcd_client::TlsOptions, PoolConfigError> {
        async fn read(key: &'static str, path: &PathBuf) -> Result<Vec<u8>, PoolConfigError> {
            tokio::fs::read(path)
                .await
                .map_err(|source| PoolConfigError::Read {
                    key,
                    path: path.clone(),
                    source,
                })
        }
        let ca = read("ca", &self.ca).await?;
        let cert = read("cert", &self.cert).await?;
        let key = read("key", &self.key).await?;
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_http_endpoints_and_bad_pool_ids_are_refused() {
        let mut c = PoolConfig::new(
            vec!["https://10.0.0.1:2379".into()],
            "ca.pem".into(),
            "n1.pem".into(),
            "n1-key.pem".into(),
            vec!["acme-kvm".into()],
        );
        c.validate().unwrap();
        c.endpoints = vec!["http://10.0.0.1:2379".into()];
        assert!(c.validate().unwrap_err().to_string().contains("TLS"));
        c.endpoints = vec![];
        assert!(c.validate().is_err());
        c.endpoints = vec!["https://10.0.0.1:2379".into()];
        c.pools = vec!["a/b".into()];
        assert!(c.validate().unwrap_err().to_string().contains("pools"));
    }

    #[test]
    fn durations_are_read_as_text_and_unknown_keys_refused() {
        let c: PoolConfig = serde_json::from_str(
            r#"{"endpoints":["https://a:1"],"ca":"c","cert":"d","key":"e","pools":["p"],"request_timeout":"500ms"}"#,
        )
        .unwrap();
        assert_eq!(c.request_timeout, Duration::from_millis(500));
        assert_eq!(c.check_interval, Duration::from_secs(1));
        assert!(serde_json::from_str::<PoolConfig>(
            r#"{"endpoints":[],"ca":"c","cert":"d","key":"e","pools":[],"tls":false}"#
        )
        .is_err());
    }
}
