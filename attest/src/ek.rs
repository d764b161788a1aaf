//! The endorsement keys an enrollment accepts: exactly the TCG EK Credential Profile templates
//! for their type, compared field by field.
//!
//! A TPM creates its EK from a template; the maker certifies the resulting key. The key alone is
//! what the certificate binds, so a request could carry the certified key inside a public area
//! with other attributes, another authPolicy or another symmetric definition, and MakeCredential
//! would still work for many such edits. hostbind accepts only the public areas a standard EK
//! has (the [`TEMPLATES`] below, with the key's own `unique`), so one TPM key has one public area.
//!
//! Templates (TCG EK Credential Profile for TPM Family 2.0, version 2.3+, appendix B.3):
//! - **L-1** RSA 2048: nameAlg SHA-256, attributes 0x000300b2 (fixedTPM, fixedParent,
//!   sensitiveDataOrigin, adminWithPolicy, restricted, decrypt), authPolicy PolicyA (SHA-256),
//!   AES-128-CFB, scheme NULL, 2048 bits, exponent 0, a 256-byte modulus. Certificate at NV
//!   0x01c00002.
//! - **L-2** ECC NIST P-256: nameAlg SHA-256, attributes 0x000300b2, PolicyA (SHA-256),
//!   AES-128-CFB, scheme NULL, kdf NULL, 32-byte x and y. Certificate at NV 0x01c0000a.
//! - **H-3** ECC NIST P-384: nameAlg SHA-384, attributes 0x000300f2 (L's plus userWithAuth),
//!   authPolicy PolicyB (SHA-384), AES-256-CFB, scheme NULL, kdf NULL, 48-byte x and y.
//!   Certificate at NV 0x01c00016. This is swtpm 0.7's ECC EK.

use crate::tpm::{alg, alg_name, curve, PublicArea, PublicKey};

/// PolicyA, SHA-256: TPM2_PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile B.3.2).
pub const POLICY_A_SHA256: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// PolicyB, SHA-384: PolicyOR(PolicyA, PolicyC) of the high-range templates (B.3.2).
pub const POLICY_B_SHA384: [u8; 48] = [
    0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc, 0xf5, 0xfd, 0x3a, 0x1a,
    0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4, 0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca,
    0xcb, 0x47, 0xba, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
];

/// TPMA_OBJECT of the low-range templates: fixedTPM, fixedParent, sensitiveDataOrigin,
/// adminWithPolicy, restricted, decrypt.
pub const ATTRIBUTES_LOW: u32 = 0x0003_00b2;
/// TPMA_OBJECT of the high-range templates: the low-range bits plus userWithAuth.
pub const ATTRIBUTES_HIGH: u32 = 0x0003_00f2;

/// The key type of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKey {
    /// RSA with this many bits and the default exponent (0).
    Rsa {
        /// Modulus size in bits.
        bits: u16,
    },
    /// ECC on this TPM_ECC_CURVE with coordinates of this many bytes.
    Ecc {
        /// TPM_ECC_CURVE.
        curve: u16,
        /// Size of x and y in bytes.
        size: usize,
    },
}

/// One TCG EK Credential Profile template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EkTemplate {
    /// The profile's name for it, e.g. "L-1 (RSA 2048)".
    pub name: &'static str,
    /// nameAlg.
    pub name_alg: u16,
    /// objectAttributes.
    pub attributes: u32,
    /// authPolicy.
    pub auth_policy: &'static [u8],
    /// AES key bits of the symmetric definition (always AES-CFB).
    pub aes_bits: u16,
    /// Key type and size.
    pub key: TemplateKey,
}

impl EkTemplate {
    /// Whether this is an ECC template.
    pub fn is_ecc(&self) -> bool {
        matches!(self.key, TemplateKey::Ecc { .. })
    }

    /// The marshalled TPMT_PUBLIC of a key made from this template with `unique` (the RSA
    /// modulus, or x then y as TPM2B_ECC_PARAMETERs without their sizes joined by the caller).
    fn marshal(&self, unique: &Unique<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(400);
        let obj_type = match self.key {
            TemplateKey::Rsa { .. } => alg::RSA,
            TemplateKey::Ecc { .. } => alg::ECC,
        };
        out.extend_from_slice(&obj_type.to_be_bytes());
        out.extend_from_slice(&self.name_alg.to_be_bytes());
        out.extend_from_slice(&self.attributes.to_be_bytes());
        push_2b(&mut out, self.auth_policy);
        out.extend_from_slice(&alg::AES.to_be_bytes());
        out.extend_from_slice(&self.aes_bits.to_be_bytes());
        out.extend_from_slice(&alg::CFB.to_be_bytes());
        out.extend_from_slice(&alg::NULL.to_be_bytes()); // scheme
        match (self.key, unique) {
            (TemplateKey::Rsa { bits }, Unique::Rsa(modulus)) => {
                out.extend_from_slice(&bits.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes()); // exponent: default
                push_2b(&mut out, modulus);
            }
            (TemplateKey::Ecc { curve, .. }, Unique::Ecc(x, y)) => {
                out.extend_from_slice(&curve.to_be_bytes());
                out.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
                push_2b(&mut out, x);
                push_2b(&mut out, y);
            }
            // A template's key type always matches the unique it is given (see `check`).
            _ => {}
        }
        out
    }
}

fn push_2b(out: &mut Vec<u8>, b: &[u8]) {
    // Template fields and checked keys are far below 64 KiB.
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

enum Unique<'a> {
    Rsa(&'a [u8]),
    Ecc(&'a [u8], &'a [u8]),
}

/// The templates hostbind accepts (and `hostbind-proxy` creates its EK from).
pub const TEMPLATES: [EkTemplate; 3] = [
    EkTemplate {
        name: "L-1 (RSA 2048)",
        name_alg: alg::SHA256,
        attributes: ATTRIBUTES_LOW,
        auth_policy: &POLICY_A_SHA256,
        aes_bits: 128,
        key: TemplateKey::Rsa { bits: 2048 },
    },
    EkTemplate {
        name: "L-2 (ECC NIST P-256)",
        name_alg: alg::SHA256,
        attributes: ATTRIBUTES_LOW,
        auth_policy: &POLICY_A_SHA256,
        aes_bits: 128,
        key: TemplateKey::Ecc {
            curve: curve::NIST_P256,
            size: 32,
        },
    },
    EkTemplate {
        name: "H-3 (ECC NIST P-384)",
        name_alg: alg::SHA384,
        attributes: ATTRIBUTES_HIGH,
        auth_policy: &POLICY_B_SHA384,
        aes_bits: 256,
        key: TemplateKey::Ecc {
            curve: curve::NIST_P384,
            size: 48,
        },
    },
];

/// Why an EK public area is not a standard EK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkTemplateError {
    /// One field differs from the template of the key's type.
    #[error(
        "the EK public area's {field} is {found}, but the TCG EK Credential Profile template \
         {template} requires {expected}: the request was edited, or the EK was not created from \
         the standard template (only standard EKs are accepted, so that one TPM has one identity)"
    )]
    Field {
        /// The TPMT_PUBLIC field, by its TPM 2.0 Part 2 name.
        field: &'static str,
        /// The template the key's type selects.
        template: &'static str,
        /// What the request has.
        found: String,
        /// What the template requires.
        expected: String,
    },
    /// No supported template has this key type.
    #[error(
        "the EK public area's {field} makes it {what}; hostbind accepts the TCG EK Credential \
         Profile templates L-1 (RSA 2048), L-2 (ECC NIST P-256) and H-3 (ECC NIST P-384) only"
    )]
    Unsupported {
        /// The field that selects the key type.
        field: &'static str,
        /// The key type found.
        what: String,
    },
}

/// Fields of a TPMT_PUBLIC in marshalling order, each with its bytes (size prefix included).
fn fields(raw: &[u8]) -> Vec<(&'static str, &[u8])> {
    struct Cur<'a> {
        buf: &'a [u8],
        out: Vec<(&'static str, &'a [u8])>,
    }
    impl<'a> Cur<'a> {
        fn take(&mut self, name: &'static str, n: usize) -> Option<&'a [u8]> {
            let n = n.min(self.buf.len());
            let (head, tail) = self.buf.split_at(n);
            self.buf = tail;
            self.out.push((name, head));
            (!head.is_empty()).then_some(head)
        }
        fn u16(&mut self, name: &'static str) -> Option<u16> {
            let b = self.take(name, 2)?;
            Some(u16::from_be_bytes([b[0], *b.get(1)?]))
        }
        fn tpm2b(&mut self, name: &'static str) -> Option<()> {
            let size = self.buf.get(..2)?;
            let n = 2 + usize::from(u16::from_be_bytes([size[0], size[1]]));
            self.take(name, n).map(|_| ())
        }
    }
    let mut c = Cur {
        buf: raw,
        out: Vec::new(),
    };
    let walk = |c: &mut Cur<'_>| -> Option<()> {
        let obj_type = c.u16("type")?;
        c.take("nameAlg", 2)?;
        c.take("objectAttributes", 4)?;
        c.tpm2b("authPolicy")?;
        if c.u16("parameters.symmetric.algorithm")? != alg::NULL {
            c.take("parameters.symmetric.keyBits", 2)?;
            c.take("parameters.symmetric.mode", 2)?;
        }
        let scheme = c.u16("parameters.scheme")?;
        match (obj_type, scheme) {
            (_, alg::NULL) | (alg::RSA, alg::RSAES) => {}
            (alg::ECC, alg::ECDAA) => {
                c.take("parameters.scheme.details", 4)?;
            }
            _ => {
                c.take("parameters.scheme.details", 2)?;
            }
        }
        if obj_type == alg::RSA {
            c.take("parameters.keyBits", 2)?;
            c.take("parameters.exponent", 4)?;
            c.tpm2b("unique (the RSA modulus)")?;
        } else {
            c.take("parameters.curveID", 2)?;
            if c.u16("parameters.kdf")? != alg::NULL {
                c.take("parameters.kdf.details", 2)?;
            }
            c.tpm2b("unique.x")?;
            c.tpm2b("unique.y")?;
        }
        Some(())
    };
    let _ = walk(&mut c);
    if !c.buf.is_empty() {
        c.out.push(("(bytes after the end)", c.buf));
    }
    c.out
}

/// A field's value for messages: algorithm names for algorithm fields, hex otherwise.
fn show(field: &str, b: &[u8]) -> String {
    let alg_field = matches!(
        field,
        "type"
            | "nameAlg"
            | "parameters.symmetric.algorithm"
            | "parameters.symmetric.mode"
            | "parameters.scheme"
            | "parameters.kdf"
    );
    match b {
        [h, l] if alg_field => {
            let v = u16::from_be_bytes([*h, *l]);
            format!("{} (0x{v:04x})", alg_name(v))
        }
        [] => "absent".into(),
        _ if b.len() > 40 => format!("{}… ({} bytes)", hex::encode(&b[..16]), b.len()),
        _ => format!("0x{}", hex::encode(b)),
    }
}

/// The template for the key type of `ek`, or why there is none.
fn template_for(ek: &PublicArea) -> Result<&'static EkTemplate, EkTemplateError> {
    let wanted = |t: &&EkTemplate| match (&ek.key, t.key) {
        (PublicKey::Rsa { bits, .. }, TemplateKey::Rsa { bits: b }) => *bits == b,
        (PublicKey::Ecc { curve, .. }, TemplateKey::Ecc { curve: c, .. }) => *curve == c,
        _ => false,
    };
    TEMPLATES.iter().find(wanted).ok_or_else(|| match &ek.key {
        PublicKey::Rsa { bits, .. } => EkTemplateError::Unsupported {
            field: "parameters.keyBits",
            what: format!("an RSA key of {bits} bits"),
        },
        PublicKey::Ecc { curve, .. } => EkTemplateError::Unsupported {
            field: "parameters.curveID",
            what: format!("an ECC key on curve 0x{curve:04x}"),
        },
    })
}

/// Checks that `ek` is exactly the standard EK of its type: the template's fields with the key's
/// own `unique` at the template's key size. Returns the template; the error names the first
/// field that differs, with what was found and what the template requires.
pub fn check_template(ek: &PublicArea) -> Result<&'static EkTemplate, EkTemplateError> {
    let t = template_for(ek)?;
    let size_err = |field: &'static str, found: usize, expected: usize| EkTemplateError::Field {
        field,
        template: t.name,
        found: format!("{found} bytes long"),
        expected: format!("{expected} bytes"),
    };
    let unique = match (&ek.key, t.key) {
        (PublicKey::Rsa { modulus, .. }, TemplateKey::Rsa { bits }) => {
            let want = usize::from(bits / 8);
            if modulus.len() != want {
                return Err(size_err("unique (the RSA modulus)", modulus.len(), want));
            }
            Unique::Rsa(modulus)
        }
        (PublicKey::Ecc { x, y, .. }, TemplateKey::Ecc { size, .. }) => {
            if x.len() != size {
                return Err(size_err("unique.x", x.len(), size));
            }
            if y.len() != size {
                return Err(size_err("unique.y", y.len(), size));
            }
            Unique::Ecc(x, y)
        }
        // template_for only returns a template of the key's type.
        _ => {
            return Err(EkTemplateError::Unsupported {
                field: "type",
                what: "a key of another type than its template".into(),
            })
        }
    };
    let expected = t.marshal(&unique);
    if expected == ek.raw {
        return Ok(t);
    }
    let want = fields(&expected);
    let got = fields(&ek.raw);
    for (i, (name, exp)) in want.iter().enumerate() {
        let found = got.get(i).map(|(_, b)| *b).unwrap_or_default();
        if found != *exp {
            return Err(EkTemplateError::Field {
                field: name,
                template: t.name,
                found: show(name, found),
                expected: show(name, exp),
            });
        }
    }
    // Every template field matched, so the request has more fields than the template.
    let (name, extra) = got.get(want.len()).copied().unwrap_or(("(end)", &[]));
    Err(EkTemplateError::Field {
        field: name,
        template: t.name,
        found: show(name, extra),
        expected: "absent".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tpm::parse_public;

    /// swtpm 0.7.1's RSA EK public area (persistent 0x81010001), modulus shortened to a pattern.
    fn rsa_ek() -> Vec<u8> {
        let mut raw = hex::decode(concat!(
            "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b",
            "331469aa00060080004300100800000000000100"
        ))
        .unwrap();
        raw.extend((0..256u32).map(|i| (i * 7 + 1) as u8));
        raw
    }

    /// swtpm 0.7.1's ECC P-384 EK public area (persistent 0x81010016).
    fn p384_ek() -> Vec<u8> {
        hex::decode(concat!(
            "0023000c000300f20030b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9",
            "bde419cacb47ba09699646150f9fc000f3f80e12000601000043001000040010",
            "003086ea476d6be32f549eb0522036a2d8e7a9e2e7030b3b5241cf9c6c74b28f8fdbe2c394a5c524eb78",
            "26075f7ae6558fed",
            "00307cfd2a6a0e84ddb3e06cd87b394815a9e9e8b07d2daac0a2854612e78711f9bd30294d03484e0bca",
            "d5670ea8eca45067"
        ))
        .unwrap()
    }

    fn check(raw: &[u8]) -> Result<&'static EkTemplate, EkTemplateError> {
        check_template(&parse_public(raw).unwrap())
    }

    fn field_of(raw: &[u8]) -> &'static str {
        match check(raw) {
            Err(EkTemplateError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn swtpm_eks_are_standard() {
        assert_eq!(check(&rsa_ek()).unwrap().name, "L-1 (RSA 2048)");
        let t = check(&p384_ek()).unwrap();
        assert_eq!(t.name, "H-3 (ECC NIST P-384)");
        assert!(t.is_ecc());
    }

    #[test]
    fn every_edited_field_is_named() {
        // (offset in the RSA EK, new bytes, field named)
        let edits: [(usize, &[u8], &str); 8] = [
            (2, &[0x00, 0x0c], "nameAlg"),
            (7, &[0xf2], "objectAttributes"),
            (10, &[0x84], "authPolicy"),
            (42, &[0x00, 0x26], "parameters.symmetric.algorithm"),
            (44, &[0x01, 0x00], "parameters.symmetric.keyBits"),
            (46, &[0x00, 0x42], "parameters.symmetric.mode"),
            (52, &[0x00, 0x00, 0x00, 0x03], "parameters.exponent"),
            (52, &[0x00, 0x01, 0x00, 0x01], "parameters.exponent"),
        ];
        for (at, new, field) in edits {
            let mut raw = rsa_ek();
            raw[at..at + new.len()].copy_from_slice(new);
            assert_eq!(field_of(&raw), field, "edit at {at}");
        }
        // A 255-byte modulus (leading byte dropped).
        let mut raw = rsa_ek();
        raw.splice(56..59, [0x00, 0xff]);
        assert_eq!(field_of(&raw), "unique (the RSA modulus)");
        // A scheme (OAEP-SHA256) where the template has NULL.
        let mut raw = rsa_ek();
        raw.splice(48..50, [0x00, 0x17, 0x00, 0x0b]);
        assert_eq!(field_of(&raw), "parameters.scheme");
        // An empty authPolicy.
        let mut raw = rsa_ek();
        raw.splice(8..42, [0x00, 0x00]);
        assert_eq!(field_of(&raw), "authPolicy");
        // P-384 with the low-range attributes.
        let mut raw = p384_ek();
        raw[7] = 0xb2;
        let e = check(&raw).unwrap_err();
        assert!(
            e.to_string().contains("objectAttributes is 0x000300b2")
                && e.to_string().contains("requires 0x000300f2")
                && e.to_string().contains("H-3"),
            "{e}"
        );
        // A KDF where the template has NULL.
        let mut raw = p384_ek();
        raw.splice(68..70, [0x00, 0x20, 0x00, 0x0b]);
        assert_eq!(field_of(&raw), "parameters.kdf");
        // A shortened x coordinate.
        let mut raw = p384_ek();
        raw.splice(70..73, [0x00, 0x2f]);
        assert_eq!(field_of(&raw), "unique.x");
    }

    #[test]
    fn unsupported_key_types_are_named() {
        let mut raw = rsa_ek();
        raw[50..52].copy_from_slice(&3072u16.to_be_bytes());
        let e = check(&raw).unwrap_err();
        assert!(
            matches!(
                e,
                EkTemplateError::Unsupported {
                    field: "parameters.keyBits",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("3072 bits"), "{e}");
    }
}
