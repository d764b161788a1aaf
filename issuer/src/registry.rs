//! The issuer's enrollment registry: a file the vendor owns (JSON, written atomically) that
//! records every host certificate `enroll finish` signed — EK certificate and EK key
//! fingerprints, host id, AK name, date — so that one TPM cannot quietly come back as another
//! host, and a re-enrollment is visible.
//!
//! The registry complements what the protocol enforces: host ids are derived from the EK
//! certificate, so the same certificate always gives the same id. It catches what that cannot:
//! the same EK key under a differently encoded certificate, host ids from another derivation
//! (older hostbind versions), and a host enrolled again with a new AK.

use hostbind_attest::enroll::Enrolled;
use hostbind_attest::signed::fmt_time;
use hostbind_fsutil::{read, write_atomic, FileError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Default file name, next to the vendor key.
pub const REGISTRY_FILE: &str = "enrollments.json";
/// `kind` of the registry file.
pub const KIND_REGISTRY: &str = "hostbind-enrollment-registry";
/// Format version.
pub const REGISTRY_VERSION: u32 = 1;

/// Errors reading or writing the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// File trouble.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not a registry.
    #[error(
        "{path} is not a hostbind enrollment registry ({reason}); it is written by \
         `hostbind-issuer enroll finish`: restore it from a backup, or pass another --registry"
    )]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One signed host certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Host id (hex).
    pub host_id: String,
    /// SHA-256 of the DER EK certificate (hex).
    pub ek_cert_sha256: String,
    /// SHA-256 of the EK key in canonical form (hex), see `hostbind_attest::enroll::EkIdentity`.
    pub ek_key_sha256: String,
    /// TCG template of the EK.
    pub ek_template: String,
    /// TPM name of the AK (hex).
    pub ak_name: String,
    /// Serial of the host certificate (hex).
    pub cert_serial: String,
    /// When it was signed (Unix seconds).
    pub enrolled_at: u64,
    /// The same as an RFC 3339 date, for people.
    pub enrolled_utc: String,
    /// The hostname the request gave, informational.
    #[serde(default)]
    pub hostname: String,
}

impl Entry {
    /// The entry for a finished enrollment.
    pub fn new(e: &Enrolled) -> Entry {
        Entry {
            host_id: hex::encode(e.ek.host_id),
            ek_cert_sha256: hex::encode(e.ek.cert_sha256),
            ek_key_sha256: hex::encode(e.ek.key_sha256),
            ek_template: e.ek_template.to_string(),
            ak_name: hex::encode(&e.ak_name),
            cert_serial: hex::encode(&e.cert.serial),
            enrolled_at: e.cert.issued_at,
            enrolled_utc: fmt_time(e.cert.issued_at),
            hostname: e.cert.facts.get("hostname").cloned().unwrap_or_default(),
        }
    }
}

/// What an earlier entry says about a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The same EK certificate (`what` = "EK certificate") or EK key (`what` = "EK key") was
    /// enrolled under another host id: one TPM would be two hosts. Refused unless overridden.
    OtherHostId {
        /// Which fingerprint matched.
        what: &'static str,
        /// The earlier entry.
        earlier: Entry,
    },
    /// The same host was enrolled before with another AK (state dir lost, or a second
    /// enrollment of the same TPM). Allowed, with a warning.
    NewAk {
        /// The earlier entry.
        earlier: Entry,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::OtherHostId { what, earlier } => write!(
                f,
                "this {what} was enrolled on {} as host {} (hostname '{}', certificate serial \
                 {}); signing would give the same TPM a second host id",
                earlier.enrolled_utc, earlier.host_id, earlier.hostname, earlier.cert_serial
            ),
            Finding::NewAk { earlier } => write!(
                f,
                "host {} was enrolled before, on {} (hostname '{}', certificate serial {}), with \
                 another attestation key (AK name {}): this is a re-enrollment of the same TPM \
                 (e.g. its state dir was lost); the earlier host certificate stays valid until \
                 it expires",
                earlier.host_id,
                earlier.enrolled_utc,
                earlier.hostname,
                earlier.cert_serial,
                earlier.ak_name
            ),
        }
    }
}

/// The registry file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Always [`KIND_REGISTRY`].
    pub kind: String,
    /// Always [`REGISTRY_VERSION`].
    pub version: u32,
    /// Every signed host certificate, oldest first.
    pub enrollments: Vec<Entry>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            kind: KIND_REGISTRY.into(),
            version: REGISTRY_VERSION,
            enrollments: Vec::new(),
        }
    }
}

impl Registry {
    /// Reads the registry at `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        if !path.exists() {
            return Ok(Registry::default());
        }
        let bad = |reason: String| RegistryError::Malformed {
            path: path.display().to_string(),
            reason,
        };
        let r: Registry = serde_json::from_slice(&read(path)?).map_err(|e| bad(e.to_string()))?;
        if r.kind != KIND_REGISTRY || r.version != REGISTRY_VERSION {
            return Err(bad(format!("kind '{}' version {}", r.kind, r.version)));
        }
        Ok(r)
    }

    /// Writes the registry to `path` atomically (temp file, fsync, rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| RegistryError::Malformed {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes, 0o600)?;
        Ok(())
    }

    /// What the earlier entries say about `new`: every conflict (same EK certificate or key
    /// under another host id) and, once, a re-enrollment of the same host with another AK.
    pub fn check(&self, new: &Entry) -> Vec<Finding> {
        let mut out = Vec::new();
        for e in self.enrollments.iter().filter(|e| e.host_id != new.host_id) {
            let what = if e.ek_cert_sha256 == new.ek_cert_sha256 {
                "EK certificate"
            } else if e.ek_key_sha256 == new.ek_key_sha256 {
                "EK key"
            } else {
                continue;
            };
            out.push(Finding::OtherHostId {
                what,
                earlier: e.clone(),
            });
        }
        let mut same_host = self.enrollments.iter().filter(|e| e.host_id == new.host_id);
        if !same_host.clone().any(|e| e.ak_name == new.ak_name) {
            if let Some(e) = same_host.next_back() {
                out.push(Finding::NewAk { earlier: e.clone() });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: u8, cert: u8, key: u8, ak: u8) -> Entry {
        Entry {
            host_id: hex::encode([host; 32]),
            ek_cert_sha256: hex::encode([cert; 32]),
            ek_key_sha256: hex::encode([key; 32]),
            ek_template: "L-1 (RSA 2048)".into(),
            ak_name: hex::encode([ak; 34]),
            cert_serial: "00".into(),
            enrolled_at: 1,
            enrolled_utc: fmt_time(1),
            hostname: "h".into(),
        }
    }

    #[test]
    fn same_ek_under_another_host_id_conflicts_new_ak_warns() {
        let mut r = Registry::default();
        r.enrollments.push(entry(1, 1, 1, 1));
        // the same enrollment again: nothing to say
        assert!(r.check(&entry(1, 1, 1, 1)).is_empty());
        // same host, new AK: a warning
        assert!(matches!(
            r.check(&entry(1, 1, 1, 2)).as_slice(),
            [Finding::NewAk { .. }]
        ));
        // same certificate, another host id
        let f = r.check(&entry(2, 1, 1, 1));
        assert!(
            matches!(
                f.as_slice(),
                [Finding::OtherHostId {
                    what: "EK certificate",
                    ..
                }]
            ),
            "{f:?}"
        );
        // another certificate of the same key, another host id
        let f = r.check(&entry(2, 2, 1, 1));
        assert!(
            matches!(f.as_slice(), [Finding::OtherHostId { what: "EK key", .. }]),
            "{f:?}"
        );
        assert!(f[0].to_string().contains("second host id"), "{}", f[0]);
        // an unrelated TPM
        assert!(r.check(&entry(3, 3, 3, 3)).is_empty());
    }

    #[test]
    fn load_save_round_trip_and_refuse_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(REGISTRY_FILE);
        assert_eq!(Registry::load(&p).unwrap(), Registry::default());
        let mut r = Registry::default();
        r.enrollments.push(entry(1, 1, 1, 1));
        r.save(&p).unwrap();
        assert_eq!(Registry::load(&p).unwrap(), r);
        std::fs::write(&p, b"{\"kind\":\"other\",\"version\":1,\"enrollments\":[]}").unwrap();
        assert!(Registry::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a hostbind enrollment registry"));
    }
}
