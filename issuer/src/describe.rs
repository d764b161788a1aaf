//! Describes hostbind files (keys, enrollment files, host certificates, licenses, tokens) as JSON
//! for scripts and as indented text for people.

use hostbind_attest::enroll::{EnrollAnswer, EnrollChallenge, EnrollRequest};
use hostbind_attest::files::{self, FileKind, VendorKeyFile, VendorPublicKeyFile};
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::{
    fmt_time, from_cbor, open, parse_sign1, HostCertificate, License, ObjectKind, SignedError,
};
use hostbind_attest::token::{KeyEvidence, TokenClaims};
use hostbind_attest::tpm;
use hostbind_attest::verify::VerifiedToken;
use serde_json::{json, Map, Value};

/// Errors describing a file.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    /// Not a hostbind file.
    #[error("not a hostbind file: it is {0}")]
    Unknown(String),
    /// The file's content is malformed.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// Anything else malformed.
    #[error("{0}")]
    Malformed(String),
}

/// A time as `{"unix": n, "utc": "..."}`.
pub fn time(t: u64) -> Value {
    json!({ "unix": t, "utc": fmt_time(t) })
}

/// Describes a host certificate payload.
pub fn host_cert(c: &HostCertificate) -> Value {
    json!({
        "host_id": c.host_id_hex(),
        "serial": hex::encode(&c.serial),
        "issued_at": time(c.issued_at),
        "not_before": time(c.validity.not_before),
        "not_after": time(c.validity.not_after),
        "ak_public": tpm_public(&c.ak_public),
        "max_key_window_secs": c.max_key_window_secs,
        "facts": c.facts,
    })
}

/// Describes a license payload. A pool license shows its pool (id, seats, the per-host
/// fallback share) instead of seats per host.
pub fn license(l: &License) -> Value {
    let mut v = json!({
        "id": l.id,
        "customer": l.customer,
        "product": l.product,
        "features": l.features,
        "hosts": l.hosts.iter().map(hex::encode).collect::<Vec<_>>(),
    });
    match l.pool() {
        Some(p) => {
            v["pool"] = json!({
                "id": p.id,
                "seats": p.seats,
                "hosts": l.hosts.len(),
                "fallback_seats_per_host": l.seats,
            })
        }
        None => v["seats_per_host"] = json!(l.seats),
    }
    let rest = json!({
        "count_mode": l.count_mode.to_string(),
        "clone_policy": l.clone_policy.to_string(),
        "grace_secs": l.grace_secs,
        "issued_at": time(l.issued_at),
        "not_before": time(l.validity.not_before),
        "not_after": time(l.validity.not_after),
        "metering_key": l.metering_key.as_ref().map(hex::encode),
    });
    if let (Value::Object(m), Value::Object(r)) = (&mut v, rest) {
        m.extend(r);
    }
    v
}

fn tpm_public(raw: &[u8]) -> Value {
    match tpm::parse_public(raw) {
        Ok(p) => json!({
            "name": p.name().map(hex::encode).unwrap_or_else(|e| e.to_string()),
            "object_attributes": format!("0x{:08x}", p.object_attributes),
            "key": match &p.key {
                tpm::PublicKey::Ecc { curve, x, y } => json!({"ecc_curve": curve, "x": hex::encode(x), "y": hex::encode(y)}),
                tpm::PublicKey::Rsa { bits, modulus, .. } => json!({"rsa_bits": bits, "modulus": hex::encode(modulus)}),
            },
        }),
        Err(e) => json!({ "error": e.to_string(), "raw": hex::encode(raw) }),
    }
}

/// Describes token claims.
pub fn claims(c: &TokenClaims) -> Value {
    json!({
        "iss_host_id": hex::encode(&c.host_id),
        "sub_vm_uuid": c.vm_uuid,
        "vm_name": c.vm_name,
        "product": c.product,
        "features": c.features,
        "scope": c.scope,
        "license_id": c.license_id,
        "license_hash": hex::encode(&c.license_hash),
        "pool": c.pool,
        "lease_id": c.lease_id,
        "iat": time(c.issued_at),
        "exp": time(c.expires_at),
        "nonce": c.nonce.as_ref().map(hex::encode),
        "chain_commitment": c.chain_commitment.as_ref().map(hex::encode),
        "quote_ref": hex::encode(&c.quote_ref),
    })
}

fn key_evidence(k: &KeyEvidence) -> Value {
    let quote = match tpm::parse_quote(&k.attest) {
        Ok(q) => json!({
            "extra_data": hex::encode(&q.extra_data),
            "clock": q.clock_info.clock,
            "reset_count": q.clock_info.reset_count,
            "restart_count": q.clock_info.restart_count,
            "safe": q.clock_info.safe,
            "firmware_version": format!("0x{:016x}", q.firmware_version),
            "pcr_digest": hex::encode(&q.pcr_digest),
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    json!({
        "token_public_key": hex::encode(&k.public_key),
        "not_before": time(k.not_before),
        "not_after": time(k.not_after),
        "quote": quote,
    })
}

/// Describes a verified token.
pub fn verified_token(v: &VerifiedToken) -> Value {
    json!({
        "verified": true,
        "claims": claims(&v.claims),
        "license": license(&v.license),
        "host_certificate": host_cert(&v.host),
        "token_key": key_evidence(&v.key),
    })
}

fn cbor<T: serde::de::DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, DescribeError> {
    Ok(from_cbor(what, b)?)
}

/// Reads a COSE_Sign1 payload without verifying it.
fn unverified_payload<T: serde::de::DeserializeOwned>(
    what: &'static str,
    b: &[u8],
) -> Result<T, DescribeError> {
    let s = parse_sign1(what, b)?;
    let p = s
        .payload
        .ok_or_else(|| DescribeError::Malformed(format!("{what} has no payload")))?;
    cbor(what, &p)
}

/// Describes any hostbind file. Signed objects are verified when `vendor` is given; otherwise
/// the description says they were not.
pub fn any(
    bytes: &[u8],
    vendor: Option<&VendorPublicKey>,
) -> Result<(FileKind, Value), DescribeError> {
    let kind = files::detect(bytes).map_err(DescribeError::Unknown)?;
    let mut v = match kind {
        FileKind::VendorKey => {
            let f: VendorKeyFile = cbor("vendor key", bytes)?;
            let k = f
                .key()
                .map_err(|e| DescribeError::Malformed(e.to_string()))?;
            json!({ "alg": f.alg, "public_key": k.public().to_string(), "private_key": "(not shown)" })
        }
        FileKind::VendorPublicKey => {
            let f: VendorPublicKeyFile = cbor("vendor public key", bytes)?;
            json!({ "alg": f.alg, "public_key": hex::encode(&f.key) })
        }
        FileKind::EnrollRequest => {
            let r: EnrollRequest = cbor("enrollment request", bytes)?;
            json!({
                "host_id": host_id(&r.ek_cert),
                "created_at": time(r.created_at),
                "ek_certificate": ek_cert_summary(&r.ek_cert),
                "ek_template": ek_template(&r.ek_public),
                "ek_public": tpm_public(&r.ek_public),
                "ak_public": tpm_public(&r.ak_public),
                "facts": r.facts,
            })
        }
        FileKind::EnrollChallenge => {
            let c: EnrollChallenge = cbor("enrollment challenge", bytes)?;
            json!({
                "host_id": hex::encode(&c.host_id),
                "expires_at": time(c.expires_at),
                "nonce": hex::encode(&c.nonce),
                "credential_bytes": c.id_object.len() + c.encrypted_secret.len(),
            })
        }
        FileKind::EnrollAnswer => {
            let a: EnrollAnswer = cbor("enrollment answer", bytes)?;
            json!({
                "host_id": host_id(&a.request.ek_cert),
                "challenge_expires_at": time(a.expires_at),
                "nonce": hex::encode(&a.nonce),
                "facts": a.request.facts,
            })
        }
        FileKind::HostCertificate => match vendor {
            Some(k) => {
                let mut d = host_cert(&open(ObjectKind::HostCertificate, bytes, k)?);
                d["signature"] = json!("verified with the vendor key");
                d
            }
            None => {
                let mut d = host_cert(&unverified_payload("host certificate", bytes)?);
                d["signature"] = json!("NOT verified (pass --vendor-pub to verify)");
                d
            }
        },
        FileKind::License => match vendor {
            Some(k) => {
                let mut d = license(&open(ObjectKind::License, bytes, k)?);
                d["signature"] = json!("verified with the vendor key");
                d
            }
            None => {
                let mut d = license(&unverified_payload("license", bytes)?);
                d["signature"] = json!("NOT verified (pass --vendor-pub to verify)");
                d
            }
        },
        FileKind::Token => {
            let s = parse_sign1("token", bytes)?;
            let p = s.payload.unwrap_or_default();
            let set = coset::cwt::ClaimsSet::from_slice(&p)
                .map_err(|e| DescribeError::Malformed(format!("token claims: {e}")))?;
            let c = TokenClaims::from_claims_set(&set).map_err(DescribeError::Malformed)?;
            json!({ "claims": claims(&c), "signature": "NOT verified (use `hostbind-issuer verify`)" })
        }
    };
    if let Value::Object(m) = &mut v {
        let mut out = Map::new();
        out.insert("kind".into(), json!(kind.name()));
        out.append(m);
        v = Value::Object(out);
    }
    Ok((kind, v))
}

use coset::CborSerializable;

/// The host id an EK certificate gives, or why it gives none.
fn host_id(ek_cert: &[u8]) -> Value {
    match hostbind_attest::enroll::host_id_of_ek_cert(ek_cert) {
        Ok(id) => json!(hex::encode(id)),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Which TCG EK template the EK public area is, or the field that differs.
fn ek_template(raw: &[u8]) -> Value {
    match tpm::parse_public(raw) {
        Ok(p) => match hostbind_attest::ek::check_template(&p) {
            Ok(t) => json!(t.name),
            Err(e) => json!({ "error": e.to_string() }),
        },
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn ek_cert_summary(der: &[u8]) -> Value {
    use x509_parser::prelude::*;
    match X509Certificate::from_der(der) {
        Ok((_, c)) => json!({
            "subject": c.subject().to_string(),
            "issuer": c.issuer().to_string(),
            "not_before": c.validity().not_before.to_string(),
            "not_after": c.validity().not_after.to_string(),
        }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Renders a JSON description as indented `key: value` text for people.
pub fn to_text(v: &Value) -> String {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => Some("-".into()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            Value::Object(m) if m.len() == 2 && m.contains_key("unix") && m.contains_key("utc") => {
                Some(format!(
                    "{} ({})",
                    m["utc"].as_str().unwrap_or(""),
                    m["unix"]
                ))
            }
            Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => Some(
                a.iter()
                    .map(|x| scalar(x).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Value::Object(m) if m.is_empty() => Some("-".into()),
            _ => None,
        }
    }
    fn walk(v: &Value, indent: usize, out: &mut String) {
        if let Value::Object(m) = v {
            for (k, x) in m {
                let label = k.replace('_', " ");
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{:indent$}{label}: {s}\n", "")),
                    None => {
                        out.push_str(&format!("{:indent$}{label}:\n", ""));
                        walk(x, indent + 2, out);
                    }
                }
            }
        } else if let Value::Array(a) = v {
            for x in a {
                out.push_str(&format!("{:indent$}-\n", ""));
                walk(x, indent + 2, out);
            }
        } else if let Some(s) = scalar(v) {
            out.push_str(&format!("{:indent$}{s}\n", ""));
        }
    }
    let mut out = String::new();
    walk(v, 0, &mut out);
    out
}
