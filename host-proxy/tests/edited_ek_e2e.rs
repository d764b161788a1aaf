//! The attack of issue 14 with the real binaries on a real swtpm: a customer who edits the EK
//! public area in `enroll-request.cbor` (the certified key stays, authPolicy / attributes /
//! exponent / nameAlg / symmetric change) must not get a second host certificate — a second
//! host id — for the same TPM. Up to 32000d0 `hostbind-issuer enroll challenge` accepted such a
//! request, the TPM activated the challenge and `enroll finish` signed a certificate with a new
//! host id; this test then fails saying so.
//!
//! Uses only the command-line tools and file formats, as the customer and the vendor do. (Run
//! against the binaries of 32000d0, it fails with "ATTACK WORKS (authPolicy edited): the vendor
//! signed a second host certificate for the same TPM, host id … besides …".)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciborium::Value;
use hostbind_testkit::host::{Host, Vendor};
use std::path::{Path, PathBuf};

/// Edits of swtpm's RSA EK public area (TCG template L-1): (offset, new bytes, field).
const EK_EDITS: [(usize, &[u8], &str); 7] = [
    (12, &[0x00], "authPolicy"),
    (7, &[0xf2], "objectAttributes"),
    (52, &[0x00, 0x01, 0x00, 0x01], "parameters.exponent"),
    (2, &[0x00, 0x0c], "nameAlg"),
    (42, &[0x00, 0x26], "parameters.symmetric.algorithm"),
    (44, &[0x01, 0x00], "parameters.symmetric.keyBits"),
    (46, &[0x00, 0x42], "parameters.symmetric.mode"),
];

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn read_cbor(p: &Path) -> Value {
    ciborium::from_reader(std::fs::read(p).unwrap().as_slice()).unwrap()
}

fn write_cbor(p: &Path, v: &Value) {
    let mut b = Vec::new();
    ciborium::into_writer(v, &mut b).unwrap();
    std::fs::write(p, b).unwrap();
}

/// The byte string at `key` of a CBOR map (one level down through `inner`, if given).
fn bytes_at<'a>(v: &'a mut Value, inner: Option<&str>, key: &str) -> &'a mut Vec<u8> {
    let mut m = v;
    if let Some(i) = inner {
        m = entry(m, i);
    }
    match entry(m, key) {
        Value::Bytes(b) => b,
        o => panic!("{key} is not bytes: {o:?}"),
    }
}

fn entry<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    let Value::Map(m) = v else {
        panic!("not a map")
    };
    m.iter_mut()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key}"))
}

fn host_id_of(json: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v["host_id"].as_str().unwrap().to_string()
}

#[test]
fn edited_ek_public_area_gets_no_second_host_certificate() {
    let v = Vendor::new().unwrap();
    let h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    let first = h.host_id.clone();
    assert_eq!(first.len(), 64);
    let d = h.dir().to_path_buf();
    let state_req: PathBuf = d.join("state").join("enroll-request.cbor");
    let req = d.join("req2.cbor");
    h.proxy_ok(&["enroll", "request", "--out", &s(&req), "--force"])
        .unwrap();
    let genuine = read_cbor(&req);

    for (at, new, field) in EK_EDITS {
        // The customer edits the EK public area in the request, and the copy the proxy keeps
        // (the answer carries the stored request).
        let mut edited = genuine.clone();
        bytes_at(&mut edited, None, "ek_public")[at..at + new.len()].copy_from_slice(new);
        let edited_path = d.join("req-edited.cbor");
        write_cbor(&edited_path, &edited);
        write_cbor(&state_req, &edited);
        let chal = d.join("chal-edited.cbor");
        let out = h
            .issuer_enroll(&v, "challenge", &edited_path, &chal, &[])
            .unwrap();
        if out.status.success() {
            // The vendor's tool accepted it: carry the attack through as the customer would.
            let ans = d.join("ans-edited.cbor");
            h.proxy_ok(&["enroll", "answer", &s(&chal), "--out", &s(&ans), "--force"])
                .unwrap();
            let fin = h
                .issuer_enroll(&v, "finish", &ans, &d.join("host-edited.cert"), &[])
                .unwrap();
            assert!(
                !fin.status.success(),
                "ATTACK WORKS ({field} edited): the vendor signed a second host certificate for \
                 the same TPM, host id {} besides {first}",
                host_id_of(&fin.stdout)
            );
            panic!(
                "the edited request ({field}) got a challenge: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field) && err.contains("TCG EK Credential Profile"),
            "challenge refusal for an edited {field} must name it: {err}"
        );
    }

    // The same edits inside an answer are refused by `enroll finish` too.
    write_cbor(&state_req, &genuine);
    let chal = d.join("chal.cbor");
    let out = h.issuer_enroll(&v, "challenge", &req, &chal, &[]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ans = d.join("ans.cbor");
    h.proxy_ok(&["enroll", "answer", &s(&chal), "--out", &s(&ans), "--force"])
        .unwrap();
    let genuine_ans = read_cbor(&ans);
    for (at, new, field) in EK_EDITS {
        let mut edited = genuine_ans.clone();
        bytes_at(&mut edited, Some("request"), "ek_public")[at..at + new.len()]
            .copy_from_slice(new);
        let p = d.join("ans-edited.cbor");
        write_cbor(&p, &edited);
        let out = h
            .issuer_enroll(&v, "finish", &p, &d.join("host-edited.cert"), &[])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(field),
            "finish must refuse an edited {field}, naming it: {err}"
        );
    }

    // The genuine second enrollment of the same TPM gets the same host id.
    let out = h
        .issuer_enroll(&v, "finish", &ans, &d.join("host2.cert"), &[])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host_id_of(&out.stdout), first);
}
