//! `[metrics]`: where the Prometheus endpoint listens.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `[metrics]` table of proxy.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`; no endpoint when absent.
    pub listen: Option<MetricsListen>,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A loopback address and port ("127.0.0.1:9464", "[::1]:9464"; port 0 picks a free one).
    Tcp(SocketAddr),
    /// A Unix socket path (absolute).
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses a `listen` value: a loopback `address:port` or an absolute Unix socket path.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        if s.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(s)));
        }
        let addr: SocketAddr = s.parse().map_err(|e| {
            format!("metrics.listen = '{s}' is neither address:port ({e}) nor an absolute Unix socket path; write e.g. \"127.0.0.1:9464\" or \"/run/hostbind/metrics.sock\"")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "metrics.listen = '{s}' is not a loopback address; metrics are served on loopback (127.0.0.1, ::1) or a Unix socket only: to scrape from another machine, put a TLS reverse proxy in front"
            ));
        }
        Ok(MetricsListen::Tcp(addr))
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MetricsListen::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_loopback_and_unix_paths_only() {
        assert_eq!(
            MetricsListen::parse("127.0.0.1:9464").unwrap(),
            MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert!(matches!(
            MetricsListen::parse("[::1]:0").unwrap(),
            MetricsListen::Tcp(_)
        ));
        assert_eq!(
            MetricsListen::parse("/run/hostbind/metrics.sock").unwrap(),
            MetricsListen::Unix("/run/hostbind/metrics.sock".into())
        );
        let e = MetricsListen::parse("0.0.0.0:9464").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = MetricsListen::parse("localhost:9464").unwrap_err();
        assert!(e.contains("neither address:port"), "{e}");
        let e = MetricsListen::parse("metrics.sock").unwrap_err();
        assert!(e.contains("absolute Unix socket path"), "{e}");
    }

    #[test]
    fn config_table_is_strict() {
        #[derive(Deserialize)]
        struct T {
            metrics: MetricsConfig,
        }
        let t: T = toml::from_str("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        assert!(t.metrics.listen.is_some());
        let t: T = toml::from_str("[metrics]\n").unwrap();
        assert!(t.metrics.listen.is_none());
        assert!(toml::from_str::<T>("[metrics]\nport = 1\n").is_err());
        let e = toml::from_str::<T>("[metrics]\nlisten = \"10.0.0.1:9464\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a loopback address"), "{e}");
    }
}
