//! Reading what the proxy needs from libvirt domain XML (name, UUID, vsock CID, the hostbind
//! assignment in `<metadata>`) and writing the assignment element. Pure functions, no I/O.

use std::collections::BTreeMap;
use std::fmt;

/// XML namespace of the hostbind assignment element in a domain's `<metadata>`.
pub const ASSIGNMENT_NS: &str = "https://hostbind.dev/xmlns/assignment/1";
/// Prefix libvirt writes the assignment element with (`<hostbind:assignment>`).
pub const ASSIGNMENT_PREFIX: &str = "hostbind";
/// Longest product name accepted in an assignment.
pub const MAX_PRODUCT_NAME: usize = 128;

/// Errors reading domain XML or an assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed XML.
    #[error("domain XML does not parse: {0}")]
    Syntax(String),
    /// A required element is missing or bad.
    #[error("domain XML: {0}")]
    Domain(String),
    /// The hostbind assignment element is malformed.
    #[error("the hostbind assignment in the domain's <metadata> is invalid: {0}; rewrite it with `hostbind-proxy vm assign`")]
    Assignment(String),
}

/// Products a VM may use on this host, from its domain metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// Product name -> seats reserved for this VM (0: allowed, nothing reserved).
    pub products: BTreeMap<String, u32>,
}

impl Assignment {
    /// Whether `product` is assigned.
    pub fn allows(&self, product: &str) -> bool {
        self.products.contains_key(product)
    }

    /// Seats of `product` reserved for this VM.
    pub fn reserve(&self, product: &str) -> u32 {
        self.products.get(product).copied().unwrap_or(0)
    }

    /// The element to store with `virDomainSetMetadata` (namespace and prefix are added by
    /// libvirt): `<assignment><product name='cad' reserve='1'/></assignment>`.
    pub fn to_xml(&self) -> String {
        let mut s = String::from("<assignment>");
        for (p, r) in &self.products {
            s.push_str("<product name=\"");
            s.push_str(&escape_attr(p));
            s.push('"');
            if *r > 0 {
                s.push_str(&format!(" reserve=\"{r}\""));
            }
            s.push_str("/>");
        }
        s.push_str("</assignment>");
        s
    }
}

impl fmt::Display for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.products.is_empty() {
            return f.write_str("no products");
        }
        let v: Vec<String> = self
            .products
            .iter()
            .map(|(p, r)| {
                if *r > 0 {
                    format!("{p} (reserve {r})")
                } else {
                    p.clone()
                }
            })
            .collect();
        f.write_str(&v.join(", "))
    }
}

/// Checks a product name given to `vm assign` (or found in metadata).
pub fn check_product_name(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > MAX_PRODUCT_NAME {
        return Err(format!(
            "product name must be 1 to {MAX_PRODUCT_NAME} characters"
        ));
    }
    if p.chars().any(char::is_control) {
        return Err("product name must not contain control characters".into());
    }
    Ok(())
}

fn escape_attr(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// What the proxy reads from one domain's XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    /// Domain name.
    pub name: String,
    /// Domain UUID, lower-case hyphenated.
    pub uuid: String,
    /// Guest CID of the domain's vsock device, when it has one with an address.
    pub cid: Option<u32>,
    /// The hostbind assignment: None when the metadata has none, Some(Err) when it is malformed.
    pub assignment: Option<Result<Assignment, XmlError>>,
}

fn parse_uuid(s: &str) -> Result<String, XmlError> {
    uuid::Uuid::parse_str(s.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|e| XmlError::Domain(format!("bad <uuid> '{}': {e}", s.trim())))
}

fn parse_assignment(node: roxmltree::Node<'_, '_>) -> Result<Assignment, XmlError> {
    let mut a = Assignment::default();
    for p in node.children().filter(|n| n.is_element()) {
        // libvirt rewrites children into the namespace; hand-written XML may leave them bare.
        let ns = p.tag_name().namespace();
        if p.tag_name().name() != "product" || !(ns.is_none() || ns == Some(ASSIGNMENT_NS)) {
            return Err(XmlError::Assignment(format!(
                "unexpected element <{}>; only <product name='...' reserve='N'/> is allowed",
                p.tag_name().name()
            )));
        }
        let name = p
            .attribute("name")
            .ok_or_else(|| XmlError::Assignment("a <product> has no name attribute".into()))?;
        check_product_name(name).map_err(XmlError::Assignment)?;
        let reserve = match p.attribute("reserve") {
            None => 0,
            Some(r) => r.trim().parse::<u32>().map_err(|_| {
                XmlError::Assignment(format!(
                    "product '{name}': reserve='{r}' is not a number of seats"
                ))
            })?,
        };
        if a.products.insert(name.to_string(), reserve).is_some() {
            return Err(XmlError::Assignment(format!(
                "product '{name}' is listed twice"
            )));
        }
    }
    Ok(a)
}

/// Parses a domain's XML (`virDomainGetXMLDesc`): name, UUID, vsock CID and assignment.
pub fn parse_domain(xml: &str) -> Result<DomainFacts, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Syntax(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(XmlError::Domain(format!(
            "root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let child = |name: &str| {
        root.children().find(|n| {
            n.is_element() && n.tag_name().name() == name && n.tag_name().namespace().is_none()
        })
    };
    let name = child("name")
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| XmlError::Domain("no <name>".into()))?;
    let uuid = parse_uuid(
        child("uuid")
            .and_then(|n| n.text())
            .ok_or_else(|| XmlError::Domain(format!("domain '{name}' has no <uuid>")))?,
    )?;
    let mut cid = None;
    if let Some(devices) = child("devices") {
        let addr = devices
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "vsock")
            .flat_map(|v| v.children())
            .find(|n| n.is_element() && n.tag_name().name() == "cid")
            .and_then(|c| c.attribute("address"));
        if let Some(a) = addr {
            let c: u32 = a.trim().parse().map_err(|_| {
                XmlError::Domain(format!(
                    "domain '{name}': vsock cid address '{a}' is not a number"
                ))
            })?;
            if c < 3 || c == u32::MAX {
                return Err(XmlError::Domain(format!(
                    "domain '{name}': vsock cid {c} is reserved (guest CIDs start at 3)"
                )));
            }
            cid = Some(c);
        }
    }
    let assignment = child("metadata").and_then(|m| {
        m.children()
            .find(|n| n.is_element() && n.has_tag_name((ASSIGNMENT_NS, "assignment")))
            .map(parse_assignment)
    });
    Ok(DomainFacts {
        name,
        uuid,
        cid,
        assignment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"<domain type='test' id='1'>
  <name>web</name>
  <uuid>11111111-2222-3333-4444-00000000000A</uuid>
  <metadata>
    <other:x xmlns:other="urn:other"><product name="nope"/></other:x>
    <hostbind:assignment xmlns:hostbind="https://hostbind.dev/xmlns/assignment/1">
      <hostbind:product name="cad" reserve="2"/>
      <product name="sim &amp; co"/>
    </hostbind:assignment>
  </metadata>
  <devices><vsock model='virtio'><cid auto='no' address='5'/></vsock></devices>
</domain>"#;

    #[test]
    fn reads_name_uuid_cid_and_assignment() {
        let f = parse_domain(WEB).unwrap();
        assert_eq!(f.name, "web");
        assert_eq!(f.uuid, "11111111-2222-3333-4444-00000000000a");
        assert_eq!(f.cid, Some(5));
        let a = f.assignment.unwrap().unwrap();
        assert_eq!(a.reserve("cad"), 2);
        assert!(a.allows("sim & co") && !a.allows("nope"));
        assert_eq!(a.to_string(), "cad (reserve 2), sim & co");
        // round trip through the element we write
        let x = format!(
            "<domain><name>w</name><uuid>11111111-2222-3333-4444-00000000000a</uuid><metadata>{}</metadata></domain>",
            a.to_xml().replace("<assignment>", &format!("<assignment xmlns=\"{ASSIGNMENT_NS}\">"))
        );
        assert_eq!(parse_domain(&x).unwrap().assignment.unwrap().unwrap(), a);
    }

    #[test]
    fn no_vsock_no_metadata_and_auto_cid_without_address() {
        let f = parse_domain("<domain><name>a</name><uuid>11111111-2222-3333-4444-000000000001</uuid><devices><vsock><cid auto='yes'/></vsock></devices></domain>").unwrap();
        assert_eq!(f.cid, None);
        assert!(f.assignment.is_none());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for (xml, want) in [
            ("<domain><name>a</name>", "does not parse"),
            ("<dom/>", "not <domain>"),
            ("<domain><uuid>11111111-2222-3333-4444-000000000001</uuid></domain>", "no <name>"),
            ("<domain><name>a</name><uuid>zz</uuid></domain>", "bad <uuid>"),
            ("<domain><name>a</name><uuid>11111111-2222-3333-4444-000000000001</uuid><devices><vsock><cid address='2'/></vsock></devices></domain>", "reserved"),
            ("<domain><name>a</name><uuid>11111111-2222-3333-4444-000000000001</uuid><devices><vsock><cid address='x'/></vsock></devices></domain>", "not a number"),
            ("<!DOCTYPE d [<!ENTITY e 'x'>]><domain/>", "does not parse"),
        ] {
            let e = parse_domain(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
        let bad = |inner: &str| {
            let x = format!("<domain><name>a</name><uuid>11111111-2222-3333-4444-000000000001</uuid><metadata><assignment xmlns='{ASSIGNMENT_NS}'>{inner}</assignment></metadata></domain>");
            parse_domain(&x)
                .unwrap()
                .assignment
                .unwrap()
                .unwrap_err()
                .to_string()
        };
        assert!(bad("<product/>").contains("no name"));
        assert!(bad("<product name='a' reserve='-1'/>").contains("not a number"));
        assert!(bad("<product name='a'/><product name='a'/>").contains("twice"));
        assert!(bad("<seat name='a'/>").contains("unexpected element <seat>"));
        assert!(bad("<product name=''/>").contains("1 to 128"));
    }
}
