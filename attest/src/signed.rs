//! Vendor-signed objects (host certificates, licenses) as COSE_Sign1 with an EdDSA signature.

use crate::keys::{VendorKey, VendorPublicKey};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use coset::{
    iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Content type of a host certificate's COSE_Sign1.
pub const CT_HOST_CERT: &str = "application/hostbind-host-cert+cbor";
/// Content type of a license's COSE_Sign1.
pub const CT_LICENSE: &str = "application/hostbind-license+cbor";
/// Content type of a token's COSE_Sign1.
pub const CT_TOKEN: &str = "application/hostbind-token+cwt";

/// Errors opening a signed object.
#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    /// Not a COSE_Sign1 structure at all.
    #[error("{what} is not a valid COSE_Sign1 object ({reason}); is this the right file?")]
    Malformed { what: &'static str, reason: String },
    /// A different kind of hostbind object.
    #[error("expected a {expected} but this is a {found}")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    /// Signed by another vendor key (kid differs).
    #[error("{what} was signed by a different vendor key (key id {found}, expected {expected}); check you use the right vendor public key")]
    OtherKey {
        what: &'static str,
        found: String,
        expected: String,
    },
    /// The signature does not verify: the object was altered or forged.
    #[error("{what} signature is invalid: the file was altered after the vendor signed it, or it is forged")]
    BadSignature { what: &'static str },
    /// The signed payload is not what the content type promises.
    #[error("{what} payload is malformed: {reason}")]
    Payload { what: &'static str, reason: String },
    /// Could not encode.
    #[error("could not encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// Kinds of vendor-signed objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A host certificate made at enrollment.
    HostCertificate,
    /// A license file.
    License,
}

impl ObjectKind {
    /// The COSE content type that marks this kind.
    pub fn content_type(self) -> &'static str {
        match self {
            ObjectKind::HostCertificate => CT_HOST_CERT,
            ObjectKind::License => CT_LICENSE,
        }
    }
    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::HostCertificate => "host certificate",
            ObjectKind::License => "license",
        }
    }
}

/// Encodes a payload as CBOR.
pub fn to_cbor<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, SignedError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| SignedError::Encode {
        what,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes a CBOR payload.
pub fn from_cbor<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, SignedError> {
    ciborium::from_reader(b).map_err(|e| SignedError::Payload {
        what,
        reason: e.to_string(),
    })
}

/// Signs `payload` as a COSE_Sign1 of `kind` with the vendor key.
pub fn sign<T: Serialize>(
    kind: ObjectKind,
    payload: &T,
    key: &VendorKey,
) -> Result<Vec<u8>, SignedError> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .content_type(kind.content_type().to_string())
        .key_id(key.public().key_id())
        .build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(to_cbor(kind.name(), payload)?)
        .create_signature(&[], |tbs| key.sign(tbs))
        .build();
    sign1.to_tagged_vec().map_err(|e| SignedError::Encode {
        what: kind.name(),
        reason: e.to_string(),
    })
}

/// Parses COSE_Sign1 bytes (tagged or untagged).
pub fn parse_sign1(what: &'static str, bytes: &[u8]) -> Result<CoseSign1, SignedError> {
    CoseSign1::from_tagged_slice(bytes)
        .or_else(|_| CoseSign1::from_slice(bytes))
        .map_err(|e| SignedError::Malformed {
            what,
            reason: e.to_string(),
        })
}

/// The content type text of a parsed COSE_Sign1, if any.
pub fn content_type(s: &CoseSign1) -> Option<String> {
    match &s.protected.header.content_type {
        Some(coset::ContentType::Text(t)) => Some(t.clone()),
        Some(coset::ContentType::Assigned(a)) => Some(format!("{a:?}")),
        None => None,
    }
}

/// Verifies a vendor-signed object of `kind` and returns its payload.
pub fn open<T: DeserializeOwned>(
    kind: ObjectKind,
    bytes: &[u8],
    vendor: &VendorPublicKey,
) -> Result<T, SignedError> {
    let what = kind.name();
    let s = parse_sign1(what, bytes)?;
    let ct = content_type(&s).unwrap_or_else(|| "object without content type".into());
    if ct != kind.content_type() {
        return Err(SignedError::WrongKind {
            expected: what,
            found: ct,
        });
    }
    let kid = &s.protected.header.key_id;
    if !kid.is_empty() && *kid != vendor.key_id() {
        return Err(SignedError::OtherKey {
            what,
            found: hex::encode(kid),
            expected: hex::encode(vendor.key_id()),
        });
    }
    if s.protected.header.alg != Some(coset::Algorithm::Assigned(iana::Algorithm::EdDSA)) {
        return Err(SignedError::BadSignature { what });
    }
    s.verify_signature(&[], |sig, tbs| {
        if vendor.verify(tbs, sig) {
            Ok(())
        } else {
            Err(SignedError::BadSignature { what })
        }
    })?;
    let payload = s.payload.as_deref().ok_or(SignedError::Payload {
        what,
        reason: "no payload".into(),
    })?;
    from_cbor(what, payload)
}

/// A validity window in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validity {
    /// First second of validity.
    pub not_before: u64,
    /// Last second of validity.
    pub not_after: u64,
}

/// Where `now` falls relative to a validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Inside the window.
    Valid,
    /// Before not_before.
    NotYetValid,
    /// After not_after.
    Expired,
}

impl Validity {
    /// Classifies `now`.
    pub fn check(&self, now: u64) -> Window {
        if now < self.not_before {
            Window::NotYetValid
        } else if now > self.not_after {
            Window::Expired
        } else {
            Window::Valid
        }
    }
}

/// Formats Unix seconds as an RFC 3339 UTC date for messages.
pub fn fmt_time(t: u64) -> String {
    let days = t / 86_400;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant), valid for the Unix era.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// A host's identity certificate, signed by the vendor at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCertificate {
    /// The host id: SHA-256 over a label and the EK certificate's SubjectPublicKeyInfo (see
    /// [`crate::enroll::host_id_of_ek_cert`]).
    pub host_id: ByteBuf,
    /// The attestation key's TPMT_PUBLIC (quotes from the host verify against it).
    pub ak_public: ByteBuf,
    /// Random serial number.
    pub serial: ByteBuf,
    /// When the vendor signed it (Unix seconds).
    pub issued_at: u64,
    /// Validity window.
    pub validity: Validity,
    /// Host facts from the enrollment request (hostname, ...), informational.
    pub facts: BTreeMap<String, String>,
    /// Longest token-key window (a quote-certified key's not_after - not_before, seconds) that
    /// verifiers accept from this host; certificates without it mean
    /// [`DEFAULT_MAX_KEY_WINDOW_SECS`].
    #[serde(default = "default_max_key_window")]
    pub max_key_window_secs: u64,
}

/// Longest token-key window a host certificate allows when it does not say (one hour).
pub const DEFAULT_MAX_KEY_WINDOW_SECS: u64 = 3600;

fn default_max_key_window() -> u64 {
    DEFAULT_MAX_KEY_WINDOW_SECS
}

impl HostCertificate {
    /// Host id as lowercase hex (the token's `iss`).
    pub fn host_id_hex(&self) -> String {
        hex::encode(&self.host_id)
    }
}

/// How a license counts seats on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountMode {
    /// One seat per VM, whatever the number of processes.
    Vm,
    /// One seat per lease (per process for process-scoped leases).
    Access,
    /// Tokens without counting.
    None,
}

impl fmt::Display for CountMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CountMode::Vm => "vm",
            CountMode::Access => "access",
            CountMode::None => "none",
        })
    }
}

impl core::str::FromStr for CountMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vm" => Ok(CountMode::Vm),
            "access" => Ok(CountMode::Access),
            "none" => Ok(CountMode::None),
            o => Err(format!("unknown count mode '{o}': use vm, access or none")),
        }
    }
}

/// What the proxy does when it detects a cloned instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClonePolicy {
    /// Record and report, keep serving.
    Observe,
    /// Refuse the later fork.
    Enforce,
}

impl fmt::Display for ClonePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClonePolicy::Observe => "observe",
            ClonePolicy::Enforce => "enforce",
        })
    }
}

impl core::str::FromStr for ClonePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "observe" => Ok(ClonePolicy::Observe),
            "enforce" => Ok(ClonePolicy::Enforce),
            o => Err(format!(
                "unknown clone policy '{o}': use observe or enforce"
            )),
        }
    }
}

/// A license: what a customer may run on which hosts, signed by the vendor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct License {
    /// License id (unique per vendor).
    pub id: String,
    /// Customer name.
    pub customer: String,
    /// Product the license is for.
    pub product: String,
    /// Features unlocked.
    pub features: Vec<String>,
    /// Host ids (32 bytes each) the license is valid on; seats apply per host. For a pool
    /// license: the enrolled hosts of the pool.
    pub hosts: Vec<ByteBuf>,
    /// Seats per host. For a pool license: the per-host fallback share, the seats each host may
    /// grant alone while the pool's coordinator is unreachable (0: none; see [`Pool`]).
    pub seats: u32,
    /// Counting mode.
    pub count_mode: CountMode,
    /// Clone handling.
    pub clone_policy: ClonePolicy,
    /// Seconds a VM that migrated in keeps its features while it re-acquires a seat.
    pub grace_secs: u64,
    /// When the vendor signed it.
    pub issued_at: u64,
    /// Validity window.
    pub validity: Validity,
    /// The vendor's metering public key (X25519, 32 bytes) the host encrypts its usage log to;
    /// absent: usage metering is off for this product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metering_key: Option<ByteBuf>,
    /// The seat pool: set, the license's seats are counted across all its hosts together (in
    /// the customer's etcd cluster) instead of per host. Absent: a per-host license.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
}

/// The pool form of a license: `seats` seats shared by every host the license names (its
/// `hosts` are the pool's members, enrolled hosts each), counted cluster-wide with the license's
/// count mode. The license's own per-host `seats` is then the fallback share: what each host may
/// grant alone while it cannot reach the pool's coordinator (counted and reported afterwards).
/// A proxy that predates pools ignores this field and reads the license as a per-host license of
/// the fallback share, so it can never grant more than the vendor allowed for an outage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Pool id (an identifier, see [`check_identifier`]): names the pool in tokens and in the
    /// coordinator's keys.
    pub id: String,
    /// Seats of the whole pool.
    pub seats: u32,
}

impl License {
    /// True when the license names this host (for a pool license: the host is in the pool).
    pub fn covers_host(&self, host_id: &[u8]) -> bool {
        self.hosts.iter().any(|h| h.as_slice() == host_id)
    }

    /// The pool, when this is a pool license.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    /// True when this is a pool license and the host is one of the pool's members.
    pub fn in_pool(&self, host_id: &[u8]) -> bool {
        self.pool.is_some() && self.covers_host(host_id)
    }

    /// The seats each host may grant without the pool's coordinator: the per-host `seats` of a
    /// pool license (the fallback share), `None` for a per-host license.
    pub fn pool_fallback_seats(&self) -> Option<u32> {
        self.pool.as_ref().map(|_| self.seats)
    }

    /// Checks the names in the license: id, product and features are identifiers
    /// ([`check_identifier`]), the customer a one-line text ([`check_text`]). The issuer checks
    /// before signing and the proxy before accepting, so a bad name never reaches `license
    /// list`, `status`, metrics or logs.
    pub fn check_names(&self) -> Result<(), NameError> {
        check_identifier("license id", &self.id)?;
        check_identifier("product", &self.product)?;
        for f in &self.features {
            check_identifier("feature", f)?;
        }
        if let Some(p) = &self.pool {
            check_identifier("pool id", &p.id)?;
        }
        check_text("customer", &self.customer)
    }
}

/// Longest name accepted in a license, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A name that is not acceptable in a license.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} {reason}")]
pub struct NameError {
    /// Which name ("product", "feature", ...).
    pub what: &'static str,
    /// The name as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

fn check_len(what: &'static str, s: &str) -> Result<(), NameError> {
    let bad = |reason: String| NameError {
        what,
        value: s.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("is empty".into()));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            s.len()
        )));
    }
    Ok(())
}

/// An identifier (license id, product, feature): 1 to [`MAX_NAME_LEN`] bytes of letters,
/// digits and `. _ - + : @`; no spaces, no control characters.
pub fn check_identifier(what: &'static str, s: &str) -> Result<(), NameError> {
    check_len(what, s)?;
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_alphanumeric() || "._-+:@".contains(*c)))
    {
        return Err(NameError {
            what,
            value: s.to_string(),
            reason: format!("contains {c:?}; use letters, digits and . _ - + : @ only (no spaces)"),
        });
    }
    Ok(())
}

/// A one-line text (a customer's name): 1 to [`MAX_NAME_LEN`] bytes, no control characters
/// (newlines, tabs, escapes), no leading or trailing space.
pub fn check_text(what: &'static str, s: &str) -> Result<(), NameError> {
    check_len(what, s)?;
    let bad = |reason: String| NameError {
        what,
        value: s.to_string(),
        reason,
    };
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(bad(format!(
            "contains the control character {c:?}; it must be one line of text"
        )));
    }
    if s.trim() != s {
        return Err(bad("starts or ends with spaces".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_licenses_are_checked() {
        let mut l = lic();
        assert_eq!(l.check_names(), Ok(()));
        for bad in [
            "",
            "a\nb",
            "two words",
            "x\u{1b}[31m",
            &"p".repeat(MAX_NAME_LEN + 1),
        ] {
            l.product = bad.to_string();
            let e = l.check_names().unwrap_err();
            assert_eq!(e.what, "product", "{bad:?}");
        }
        l.product = "cad-2.0_pro+x:@y".into();
        assert_eq!(l.check_names(), Ok(()));
        l.features = vec!["ok".into(), "new\nline".into()];
        assert_eq!(l.check_names().unwrap_err().what, "feature");
        l.features.clear();
        l.customer = "ACME Corp. (Europe)".into();
        assert_eq!(l.check_names(), Ok(()));
        for bad in ["", "ACME\nEvil", " ACME", "A\tB"] {
            l.customer = bad.to_string();
            assert_eq!(l.check_names().unwrap_err().what, "customer", "{bad:?}");
        }
        let e = check_identifier("product", "").unwrap_err().to_string();
        assert_eq!(e, "product \"\" is empty");
        let e = check_identifier("product", "a\nb").unwrap_err().to_string();
        assert!(e.contains("'\\n'") && e.contains("no spaces"), "{e}");
    }

    fn lic() -> License {
        License {
            id: "L1".into(),
            customer: "ACME".into(),
            product: "cad".into(),
            features: vec!["pro".into()],
            hosts: vec![ByteBuf::from(vec![7u8; 32])],
            seats: 2,
            count_mode: CountMode::Vm,
            clone_policy: ClonePolicy::Observe,
            grace_secs: 300,
            issued_at: 1,
            validity: Validity {
                not_before: 0,
                not_after: 100,
            },
            metering_key: None,
            pool: None,
        }
    }

    #[test]
    fn pool_license_names_its_members_and_round_trips() {
        let k = VendorKey::generate().unwrap();
        let mut l = lic();
        assert!(l.pool().is_none() && !l.in_pool(&[7u8; 32]));
        assert_eq!(l.pool_fallback_seats(), None);
        l.hosts.push(ByteBuf::from(vec![8u8; 32]));
        l.seats = 1;
        l.pool = Some(Pool {
            id: "acme-kvm".into(),
            seats: 40,
        });
        assert!(l.in_pool(&[7u8; 32]) && l.in_pool(&[8u8; 32]));
        assert!(!l.in_pool(&[9u8; 32]));
        assert_eq!(l.pool_fallback_seats(), Some(1));
        let b = sign(ObjectKind::License, &l, &k).unwrap();
        let back: License = open(ObjectKind::License, &b, &k.public()).unwrap();
        assert_eq!(back, l);
        l.pool = Some(Pool {
            id: "two words".into(),
            seats: 40,
        });
        assert_eq!(l.check_names().unwrap_err().what, "pool id");
    }

    #[test]
    fn pool_license_read_by_a_proxy_without_pools_is_its_fallback_share() {
        // What a proxy from before pools decodes (its License had no pool field; serde skips
        // fields it does not know).
        #[derive(Deserialize)]
        struct PrePoolLicense {
            hosts: Vec<ByteBuf>,
            seats: u32,
            count_mode: CountMode,
        }
        let mut l = lic();
        l.seats = 1;
        l.pool = Some(Pool {
            id: "acme-kvm".into(),
            seats: 40,
        });
        let old: PrePoolLicense = from_cbor("license", &to_cbor("license", &l).unwrap()).unwrap();
        assert_eq!(
            (old.hosts, old.seats, old.count_mode),
            (l.hosts, 1, CountMode::Vm)
        );
        // A per-host license encodes without the field: its bytes (and hash) are as before.
        let bytes = to_cbor("license", &lic()).unwrap();
        let v: ciborium::Value = from_cbor("license", &bytes).unwrap();
        let keys = v.as_map().unwrap().iter().filter_map(|(k, _)| k.as_text());
        assert!(
            keys.clone().all(|k| k != "pool"),
            "{:?}",
            keys.collect::<Vec<_>>()
        );
    }

    #[test]
    fn sign_and_open_round_trip_and_tamper() {
        let k = VendorKey::generate().unwrap();
        let b = sign(ObjectKind::License, &lic(), &k).unwrap();
        let l: License = open(ObjectKind::License, &b, &k.public()).unwrap();
        assert_eq!(l, lic());
        assert!(matches!(
            open::<HostCertificate>(ObjectKind::HostCertificate, &b, &k.public()),
            Err(SignedError::WrongKind { .. })
        ));
        let other = VendorKey::generate().unwrap();
        assert!(matches!(
            open::<License>(ObjectKind::License, &b, &other.public()),
            Err(SignedError::OtherKey { .. })
        ));
        // Flip every byte once: never accepted, never a panic.
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x01;
            assert!(
                open::<License>(ObjectKind::License, &t, &k.public()).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn host_certificate_without_key_window_means_one_hour() {
        // A certificate signed before the field existed.
        let v = ciborium::Value::Map(
            [
                ("host_id", ciborium::Value::Bytes(vec![1; 32])),
                ("ak_public", ciborium::Value::Bytes(vec![2; 8])),
                ("serial", ciborium::Value::Bytes(vec![3; 16])),
                ("issued_at", ciborium::Value::Integer(1.into())),
                (
                    "validity",
                    ciborium::Value::Map(vec![
                        ("not_before".into(), 1.into()),
                        ("not_after".into(), 2.into()),
                    ]),
                ),
                ("facts", ciborium::Value::Map(vec![])),
            ]
            .into_iter()
            .map(|(k, v)| (ciborium::Value::Text(k.into()), v))
            .collect(),
        );
        let bytes = to_cbor("old certificate", &v).unwrap();
        let c: HostCertificate = from_cbor("host certificate", &bytes).unwrap();
        assert_eq!(c.max_key_window_secs, 3600);
    }

    #[test]
    fn validity_and_time_format() {
        let v = Validity {
            not_before: 10,
            not_after: 20,
        };
        assert_eq!(v.check(5), Window::NotYetValid);
        assert_eq!(v.check(10), Window::Valid);
        assert_eq!(v.check(21), Window::Expired);
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_795_392_000), "2026-11-23T00:00:00Z");
        assert_eq!(fmt_time(951_782_400), "2000-02-29T00:00:00Z");
    }
}
