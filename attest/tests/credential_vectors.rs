//! Credentials that a real TPM accepted, pinned as regression vectors.
//!
//! `write_tpm2_tools_files` (ignored) makes credentials with a deterministic RNG for the fixture
//! EKs and the fixture AK's name, in tpm2-tools' credential file format. They were fed to
//! `tpm2_activatecredential` on the swtpm that produced the fixtures, which returned the secret
//! (commands in tests/fixtures/README.txt); the files are kept as `cred_*.tpm2tools`, and
//! `credentials_match_tpm_accepted_vectors` checks that make_credential still produces them.
//!
//! If that test fails only after a dependency upgrade, check whether the `rsa`/`p256`/`p384`
//! crates changed how they draw random bytes (the RSA check compares only the part that depends
//! on the seed); regenerate with `HOSTBIND_CRED_OUT=DIR cargo test -p hostbind-attest --test
//! credential_vectors -- --ignored` and re-run the activation before replacing the fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::credential::{make_credential_with_rng, Credential};
use hostbind_attest::tpm::parse_public;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Deterministic byte stream SHA-256(label || counter) for reproducible vectors. Test only.
struct TestRng {
    label: &'static [u8],
    counter: u64,
    buf: Vec<u8>,
}

impl TestRng {
    fn new(label: &'static [u8]) -> Self {
        Self {
            label,
            counter: 0,
            buf: Vec::new(),
        }
    }
}

impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_be_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_be_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest.iter_mut() {
            if self.buf.is_empty() {
                let mut h = Sha256::new();
                h.update(self.label);
                h.update(self.counter.to_be_bytes());
                self.counter += 1;
                self.buf = h.finalize().to_vec();
                self.buf.reverse();
            }
            *d = self.buf.pop().unwrap();
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for TestRng {}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

/// The secret every vector protects.
const SECRET: &[u8] = b"hostbind vector secret, 32 bytes";

/// (EK fixture, credential fixture, RNG label)
const VECTORS: [(&str, &str, &[u8]); 3] = [
    ("ek_rsa.tpmt", "cred_rsa.tpm2tools", b"hostbind rsa"),
    (
        "ek_ecc256.tpmt",
        "cred_ecc256.tpm2tools",
        b"hostbind ecc256",
    ),
    (
        "ek_ecc384.tpmt",
        "cred_ecc384.tpm2tools",
        b"hostbind ecc384",
    ),
];

fn make(ek_file: &str, label: &'static [u8]) -> Credential {
    let ek = parse_public(&fixture(ek_file)).unwrap();
    let name = fixture("ak_ecc256.name");
    make_credential_with_rng(&ek, &name, SECRET, &mut TestRng::new(label)).unwrap()
}

#[test]
#[ignore = "writes credential files for a manual tpm2_activatecredential run"]
fn write_tpm2_tools_files() {
    let out = PathBuf::from(std::env::var_os("HOSTBIND_CRED_OUT").expect("set HOSTBIND_CRED_OUT"));
    std::fs::create_dir_all(&out).unwrap();
    for (ek_file, cred_file, label) in VECTORS {
        let file = make(ek_file, label).to_tpm2_tools().unwrap();
        std::fs::write(out.join(cred_file), file).unwrap();
    }
    std::fs::write(out.join("secret.bin"), SECRET).unwrap();
}

/// Splits a tpm2-tools credential file into (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) contents.
fn split_tpm2_tools(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(&file[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let id_len = u16::from_be_bytes([file[8], file[9]]) as usize;
    let id = file[10..10 + id_len].to_vec();
    let rest = &file[10 + id_len..];
    let sec_len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    assert_eq!(rest.len(), 2 + sec_len);
    (id, rest[2..].to_vec())
}

#[test]
fn credentials_match_tpm_accepted_vectors() {
    for (ek_file, cred_file, label) in VECTORS {
        let accepted = fixture(cred_file);
        let (id_object, encrypted_secret) = split_tpm2_tools(&accepted);
        let ours = make(ek_file, label);
        // The ID object depends only on the seed, which is the RNG's first output for an RSA
        // EK and the ECDH result for an ECC EK.
        assert_eq!(ours.id_object, id_object, "{cred_file}: id object");
        if ek_file == "ek_rsa.tpmt" {
            assert_eq!(ours.encrypted_secret.len(), encrypted_secret.len());
        } else {
            assert_eq!(ours.encrypted_secret, encrypted_secret, "{cred_file}");
            assert_eq!(ours.to_tpm2_tools().unwrap(), accepted);
        }
    }
}

#[test]
fn tpm2_tools_makecredential_file_layout_matches() {
    // Made by `tpm2_makecredential -T none -u ek_rsa.tpm2b -s <16 bytes> -n <ak_ecc256 name>`:
    // the same header and TPM2B layout our to_tpm2_tools() writes.
    let theirs = fixture("tpm2_makecredential_rsa.out");
    let (id_object, encrypted_secret) = split_tpm2_tools(&theirs);
    assert_eq!(id_object.len(), 2 + 32 + 2 + 16);
    assert_eq!(encrypted_secret.len(), 256);
    let ours = make("ek_rsa.tpmt", b"layout").to_tpm2_tools().unwrap();
    assert_eq!(
        ours.len(),
        theirs.len() + 16,
        "ours protects 32 bytes, theirs 16"
    );
}
