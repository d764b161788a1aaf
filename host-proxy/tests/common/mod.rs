//! Shared by tests and benches: an enrolled host on a real swtpm and a token signer on it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::enroll::{self, CertTerms, EnrollPolicy};
use hostbind_attest::keys::{TokenKey, VendorKey};
use hostbind_attest::signed::{sign, ClonePolicy, CountMode, License, ObjectKind, Validity};
use hostbind_attest::token::{key_binding, KeyEvidence, TokenSigner};
use hostbind_proxy::enroll as host;
use hostbind_proxy::tpm::Tpm;
use hostbind_testkit::{LocalCa, Swtpm};
use serde_bytes::ByteBuf;

/// The tests' "now": the real time at first use (EK certificates are made at TPM start).
pub fn t0() -> u64 {
    static T0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 5
    })
}

pub fn cas(ca: &LocalCa) -> Vec<Vec<u8>> {
    ca.cert_paths()
        .iter()
        .flat_map(|p| enroll::parse_ca_certs(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

pub struct Host {
    pub _swtpm: Swtpm,
    pub tpm: Tpm,
    pub state: tempfile::TempDir,
}

pub fn host(swtpm: Swtpm) -> Host {
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    Host {
        _swtpm: swtpm,
        tpm,
        state: tempfile::tempdir().unwrap(),
    }
}

/// The host certificate terms the tests use: one year, the default key window (1 h).
pub const TERMS: CertTerms = CertTerms {
    validity_secs: 86_400 * 365,
    max_key_window_secs: enroll::DEFAULT_MAX_KEY_WINDOW_SECS,
};

/// Runs the whole exchange and returns the host certificate bytes.
pub fn enroll_host(h: &mut Host, trust: &[Vec<u8>], vendor: &VendorKey) -> Vec<u8> {
    let policy = EnrollPolicy::default();
    let req = host::request(&mut h.tpm, h.state.path(), t0()).unwrap();
    let chal = enroll::create_challenge(&req, trust, vendor, t0(), 3600, &policy).unwrap();
    let ans = host::answer(&mut h.tpm, h.state.path(), &chal).unwrap();
    let done = enroll::finish(&ans, trust, vendor, t0() + 10, &policy, &TERMS).unwrap();
    assert_eq!(
        done.cert.host_id.as_slice(),
        enroll::host_id_of_ek_cert(&req.ek_cert).unwrap()
    );
    done.bytes
}

/// A license for `product` with `features` on `host_id`, valid from t0() for a day: its payload
/// and signed bytes.
pub fn license(
    vendor: &VendorKey,
    host_id: &[u8],
    product: &str,
    features: &[&str],
) -> (License, Vec<u8>) {
    let l = License {
        id: format!("L-{product}"),
        customer: "ACME".into(),
        product: product.into(),
        features: features.iter().map(|f| f.to_string()).collect(),
        hosts: vec![ByteBuf::from(host_id.to_vec())],
        seats: 2,
        count_mode: CountMode::Vm,
        clone_policy: ClonePolicy::Observe,
        grace_secs: 0,
        issued_at: t0(),
        validity: Validity {
            not_before: t0(),
            not_after: t0() + 86_400,
        },
        metering_key: None,
        pool: None,
    };
    let b = sign(ObjectKind::License, &l, vendor).unwrap();
    (l, b)
}

pub fn signer(h: &mut Host, cert: Vec<u8>, nb: u64, na: u64) -> TokenSigner {
    let key = TokenKey::generate().unwrap();
    let pk = key.public_sec1();
    let q = h.tpm.quote(&key_binding(&pk, nb, na)).unwrap();
    let ev = KeyEvidence {
        public_key: ByteBuf::from(pk),
        not_before: nb,
        not_after: na,
        attest: ByteBuf::from(q.attest),
        signature: ByteBuf::from(q.signature),
    };
    TokenSigner::new(key, ev, cert).unwrap()
}
