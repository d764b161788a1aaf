//! Refusals are counted, not written one by one: one counter per (VM, error code, product)
//! and interval (`[limits] refusal_interval`), written as one history entry and one usage-log
//! record each when the interval ends. A flood of refused requests so costs the disk a few
//! records a minute, whatever its rate.
//!
//! Nothing a guest chose is stored unbounded: a product without a license on this host is
//! recorded as [`UNLICENSED`] (never the name the guest sent), and messages are cut to
//! [`MAX_MESSAGE`] characters with control characters replaced.

use hostbind_attest::wire::ErrorBody;
use std::collections::HashMap;
use std::sync::Mutex;

/// The product recorded for a refusal whose product has no license on this host.
pub const UNLICENSED: &str = "<unlicensed>";
/// Longest message kept with a refusal count, in characters.
pub const MAX_MESSAGE: usize = 200;
/// Most distinct (VM, code, product) counters in one interval; refusals beyond are only
/// counted in total.
pub const MAX_COUNTERS: usize = 4096;

/// What a refused request was for, as the service knows it.
#[derive(Debug, Clone, Copy)]
pub enum Product<'a> {
    /// A product this host has a license for (its license id and customer).
    Licensed {
        /// Product.
        name: &'a str,
        /// License id.
        license_id: &'a str,
        /// Customer.
        customer: &'a str,
    },
    /// A product without a license here: the guest's string is not kept.
    Unlicensed,
    /// The request named no product (a Hello, a release of an unknown lease).
    None,
}

/// The refusals of one (VM, code, product) in one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount {
    /// VM UUID.
    pub vm_uuid: String,
    /// VM name.
    pub vm_name: String,
    /// Error code, as on the wire.
    pub code: String,
    /// Product ([`UNLICENSED`] for one without a license, empty for none).
    pub product: String,
    /// License id, for a licensed product.
    pub license_id: String,
    /// Customer, for a licensed product.
    pub customer: String,
    /// How many.
    pub count: u64,
    /// Unix seconds of the first.
    pub first: u64,
    /// Unix seconds of the last.
    pub last: u64,
    /// The last one's message (bounded, see [`bounded_message`]).
    pub message: String,
}

#[derive(Debug, Default)]
struct Inner {
    counts: HashMap<(String, String, String), RefusalCount>,
    /// Refusals that found every counter taken.
    uncounted: u64,
}

/// The counters of the current interval.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<Inner>);

/// The error code's wire name.
pub fn code_name(e: &ErrorBody) -> String {
    serde_json::to_value(e.code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "other".into())
}

/// A message fit to store: at most [`MAX_MESSAGE`] characters, control characters replaced;
/// for a product without a license, a fixed text (the guest's message could quote its string).
pub fn bounded_message(product: Product<'_>, e: &ErrorBody) -> String {
    if matches!(product, Product::Unlicensed) {
        return "no license on this host for the product asked for".into();
    }
    let mut m: String = e
        .message
        .chars()
        .take(MAX_MESSAGE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if e.message.chars().count() > MAX_MESSAGE {
        m.push('…');
    }
    m
}

impl Refusals {
    /// Counts one refusal of `vm` (uuid, name).
    pub fn add(&self, vm: (&str, &str), product: Product<'_>, e: &ErrorBody, now: u64) {
        let (name, license_id, customer) = match product {
            Product::Licensed {
                name,
                license_id,
                customer,
            } => (name, license_id, customer),
            Product::Unlicensed => (UNLICENSED, "", ""),
            Product::None => ("", "", ""),
        };
        let code = code_name(e);
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (vm.0.to_string(), code, name.to_string());
        if let Some(c) = g.counts.get_mut(&key) {
            c.count = c.count.saturating_add(1);
            c.last = c.last.max(now);
            c.message = bounded_message(product, e);
            return;
        }
        if g.counts.len() >= MAX_COUNTERS {
            g.uncounted = g.uncounted.saturating_add(1);
            return;
        }
        let c = RefusalCount {
            vm_uuid: key.0.clone(),
            vm_name: vm.1.chars().take(MAX_MESSAGE).collect(),
            code: key.1.clone(),
            product: key.2.clone(),
            license_id: license_id.to_string(),
            customer: customer.to_string(),
            count: 1,
            first: now,
            last: now,
            message: bounded_message(product, e),
        };
        g.counts.insert(key, c);
    }

    /// Takes the interval's counters (sorted by VM, code, product) and the count of refusals
    /// that found no free counter.
    pub fn take(&self) -> (Vec<RefusalCount>, u64) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<RefusalCount> = std::mem::take(&mut g.counts).into_values().collect();
        v.sort_by(|a, b| (&a.vm_uuid, &a.code, &a.product).cmp(&(&b.vm_uuid, &b.code, &b.product)));
        (v, std::mem::take(&mut g.uncounted))
    }

    /// Counters waiting.
    pub fn waiting(&self) -> usize {
        self.0.lock().map(|g| g.counts.len()).unwrap_or(0)
    }
}

impl RefusalCount {
    /// The history entry's detail.
    pub fn detail(&self) -> String {
        let what = if self.product.is_empty() {
            String::new()
        } else {
            format!(" for '{}'", self.product)
        };
        let times = if self.count == 1 {
            format!("1 request{what} refused ({})", self.code)
        } else {
            format!(
                "{} requests{what} refused ({}) between {} and {}",
                self.count,
                self.code,
                hostbind_attest::signed::fmt_time(self.first),
                hostbind_attest::signed::fmt_time(self.last)
            )
        };
        format!(
            "{times} from {} ({}); last: {}",
            self.vm_name, self.vm_uuid, self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostbind_attest::wire::ErrorCode;

    fn e(code: ErrorCode, m: &str) -> ErrorBody {
        ErrorBody {
            code,
            message: m.into(),
        }
    }

    #[test]
    fn counts_per_vm_code_and_product_without_guest_strings() {
        let r = Refusals::default();
        let vm = ("uuid-a", "a");
        for i in 0..1000 {
            r.add(
                vm,
                Product::Unlicensed,
                &e(
                    ErrorCode::NoLicense,
                    &format!("no license for product 'junk-{i}'"),
                ),
                100 + i,
            );
        }
        let cad = Product::Licensed {
            name: "cad",
            license_id: "L1",
            customer: "ACME",
        };
        r.add(vm, cad, &e(ErrorCode::SeatsExhausted, "full"), 5);
        r.add(
            ("uuid-b", "b"),
            cad,
            &e(ErrorCode::SeatsExhausted, "full"),
            6,
        );
        let (v, lost) = r.take();
        assert_eq!(lost, 0);
        assert_eq!(v.len(), 3);
        let junk = v.iter().find(|c| c.code == "no_license").unwrap();
        assert_eq!(junk.count, 1000);
        assert_eq!((junk.first, junk.last), (100, 1099));
        assert_eq!(junk.product, UNLICENSED);
        assert!(!junk.message.contains("junk"), "{}", junk.message);
        assert!(!junk.detail().contains("junk"), "{}", junk.detail());
        assert!(junk
            .detail()
            .starts_with("1000 requests for '<unlicensed>' refused (no_license) between"));
        assert_eq!(
            v.iter()
                .filter(|c| c.code == "seats_exhausted" && c.customer == "ACME")
                .count(),
            2
        );
        // The interval starts again empty.
        assert_eq!(r.take().0.len(), 0);
    }

    #[test]
    fn messages_are_bounded_and_counters_capped() {
        let long = format!("x\n{}", "y".repeat(5000));
        let m = bounded_message(Product::None, &e(ErrorCode::Busy, &long));
        assert_eq!(m.chars().count(), MAX_MESSAGE + 1);
        assert!(!m.contains('\n'));
        let r = Refusals::default();
        for i in 0..MAX_COUNTERS + 10 {
            r.add(
                (&format!("vm-{i}"), "n"),
                Product::None,
                &e(ErrorCode::Busy, "b"),
                1,
            );
        }
        let (v, lost) = r.take();
        assert_eq!((v.len(), lost), (MAX_COUNTERS, 10));
    }
}
