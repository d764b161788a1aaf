//! A usage block's plaintext, [`BlockBody`], and its compact CBOR form: VMs, (product, license, customer) triples and
//! leases are written once per block in tables, records refer to them by index and use
//! one-letter keys. A lease that starts, gets a token and ends within one block costs its
//! identity once, not three times. [`BodyBuilder`] fills a body up to a size limit and knows
//! its exact encoded size without encoding the whole body again for every record.

use super::record::{is_one, is_zero, one};
use super::{to_cbor, LeaseRef, UsageError, UsageRecord, VmRef};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The encrypted content of one block (written in the compact form below: tables of VMs,
/// parties and leases, records by index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "WireBody", try_from = "WireBody")]
pub struct BlockBody {
    /// Host id (SHA-256 of the EK public area), hex.
    pub host_id: String,
    /// Records in the order they happened.
    pub records: Vec<UsageRecord>,
}

impl BlockBody {
    /// CBOR size of this body.
    pub fn encoded_len(&self) -> Result<usize, UsageError> {
        Ok(to_cbor(self)?.len())
    }
}

/// Product, license id and customer, as one table entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Party {
    #[serde(rename = "p")]
    product: String,
    #[serde(rename = "l")]
    license_id: String,
    #[serde(rename = "c")]
    customer: String,
}

/// A lease as one table entry: its id and indices into the VM and party tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct WireLease {
    #[serde(rename = "i")]
    id: String,
    #[serde(rename = "v")]
    vm: u32,
    #[serde(rename = "p")]
    party: u32,
}

/// A record with indices instead of names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t")]
enum WireRecord {
    #[serde(rename = "s")]
    LeaseStart { a: u64, l: u32, s: String },
    #[serde(rename = "n")]
    LeaseRenew { a: u64, l: u32 },
    #[serde(rename = "e")]
    LeaseEnd { a: u64, l: u32, r: String },
    #[serde(rename = "k")]
    TokenIssued {
        a: u64,
        l: u32,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        c: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        z: Option<u64>,
    },
    #[serde(rename = "x")]
    Refusal {
        a: u64,
        p: u32,
        v: u32,
        c: String,
        m: String,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        n: u64,
    },
    #[serde(rename = "c")]
    CloneReport {
        a: u64,
        p: u32,
        v: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        o: Option<u32>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        f: bool,
        d: String,
    },
    #[serde(rename = "q")]
    PoolSeat {
        a: u64,
        l: u32,
        o: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        f: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        m: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        s: u32,
    },
    #[serde(rename = "g")]
    PoolReconcile {
        a: u64,
        o: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        f: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        x: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        n: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        r: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        z: Vec<String>,
    },
    #[serde(rename = "d")]
    RecordsDropped {
        a: u64,
        c: u64,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        r: String,
    },
    #[serde(rename = "u")]
    UncleanStop { a: u64, s: u64, f: u64 },
}

/// The body as written: tables, then records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireBody {
    #[serde(rename = "h")]
    host_id: String,
    #[serde(rename = "v")]
    vms: Vec<VmRef>,
    #[serde(rename = "p")]
    parties: Vec<Party>,
    #[serde(rename = "l")]
    leases: Vec<WireLease>,
    #[serde(rename = "r")]
    records: Vec<WireRecord>,
}

fn cbor_len<T: Serialize>(v: &T) -> usize {
    let mut w = CountingWriter(0);
    // Writing to a counter cannot fail for these plain types; an error would only make the
    // estimate too small, and `seal_block` checks the real size anyway.
    let _ = ciborium::into_writer(v, &mut w);
    w.0
}

/// Counts bytes instead of keeping them.
struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0 += data.len();
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of the CBOR header of an array of `n` items.
fn array_header(n: usize) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// The index of `v` in `table`, appending it (and adding its size to `items`) when new.
fn intern<T: Clone + Eq + std::hash::Hash + Serialize>(
    table: &mut Vec<T>,
    ix: &mut HashMap<T, u32>,
    items: &mut usize,
    v: T,
) -> u32 {
    if let Some(&i) = ix.get(&v) {
        return i;
    }
    let i = table.len() as u32;
    *items += cbor_len(&v);
    table.push(v.clone());
    ix.insert(v, i);
    i
}

/// Drops the entries of `table` from `len` on.
fn truncate<T: Eq + std::hash::Hash>(table: &mut Vec<T>, ix: &mut HashMap<T, u32>, len: usize) {
    for v in table.drain(len..) {
        ix.remove(&v);
    }
}

/// Fills a block body record by record, with tables shared by the records.
#[derive(Debug, Clone, Default)]
pub struct BodyBuilder {
    wire: WireBody,
    vm_ix: HashMap<VmRef, u32>,
    party_ix: HashMap<Party, u32>,
    lease_ix: HashMap<WireLease, u32>,
    /// Encoded size of the items of each table and of the records.
    items: usize,
    /// Encoded size of the empty body less its four empty-array headers.
    base: usize,
    records: Vec<UsageRecord>,
}

impl BodyBuilder {
    /// An empty body of host `host_id`.
    pub fn new(host_id: &str) -> BodyBuilder {
        let wire = WireBody {
            host_id: host_id.to_string(),
            ..WireBody::default()
        };
        let base = cbor_len(&wire) - 4 * array_header(0);
        BodyBuilder {
            wire,
            base,
            ..BodyBuilder::default()
        }
    }

    /// Exact CBOR size of the body so far.
    pub fn size(&self) -> usize {
        self.base
            + self.items
            + array_header(self.wire.vms.len())
            + array_header(self.wire.parties.len())
            + array_header(self.wire.leases.len())
            + array_header(self.wire.records.len())
    }

    /// Records so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds `r` when the body then still fits in `limit` bytes; gives it back otherwise.
    pub fn push(&mut self, r: UsageRecord, limit: usize) -> Result<(), Box<UsageRecord>> {
        let saved = (
            self.wire.vms.len(),
            self.wire.parties.len(),
            self.wire.leases.len(),
            self.items,
        );
        let w = self.intern(&r);
        self.items += cbor_len(&w);
        self.wire.records.push(w);
        if self.size() > limit {
            // undo: drop the record and the table entries it added
            self.wire.records.pop();
            truncate(&mut self.wire.vms, &mut self.vm_ix, saved.0);
            truncate(&mut self.wire.parties, &mut self.party_ix, saved.1);
            truncate(&mut self.wire.leases, &mut self.lease_ix, saved.2);
            self.items = saved.3;
            return Err(Box::new(r));
        }
        self.records.push(r);
        Ok(())
    }

    /// The body built.
    pub fn finish(self) -> BlockBody {
        BlockBody {
            host_id: self.wire.host_id,
            records: self.records,
        }
    }

    /// The records added so far, in order (for putting them back when sealing fails).
    pub fn into_records(self) -> Vec<UsageRecord> {
        self.records
    }

    fn vm(&mut self, v: &VmRef) -> u32 {
        intern(
            &mut self.wire.vms,
            &mut self.vm_ix,
            &mut self.items,
            v.clone(),
        )
    }

    fn party(&mut self, product: &str, license_id: &str, customer: &str) -> u32 {
        let p = Party {
            product: product.to_string(),
            license_id: license_id.to_string(),
            customer: customer.to_string(),
        };
        intern(
            &mut self.wire.parties,
            &mut self.party_ix,
            &mut self.items,
            p,
        )
    }

    fn lease(&mut self, l: &LeaseRef) -> u32 {
        let w = WireLease {
            id: l.lease_id.clone(),
            vm: self.vm(&l.vm),
            party: self.party(&l.product, &l.license_id, &l.customer),
        };
        intern(
            &mut self.wire.leases,
            &mut self.lease_ix,
            &mut self.items,
            w,
        )
    }

    fn intern(&mut self, r: &UsageRecord) -> WireRecord {
        match r {
            UsageRecord::LeaseStart { at, lease, scope } => WireRecord::LeaseStart {
                a: *at,
                l: self.lease(lease),
                s: scope.clone(),
            },
            UsageRecord::LeaseRenew { at, lease } => WireRecord::LeaseRenew {
                a: *at,
                l: self.lease(lease),
            },
            UsageRecord::LeaseEnd { at, lease, reason } => WireRecord::LeaseEnd {
                a: *at,
                l: self.lease(lease),
                r: reason.clone(),
            },
            UsageRecord::TokenIssued {
                at,
                lease,
                count,
                last,
            } => WireRecord::TokenIssued {
                a: *at,
                l: self.lease(lease),
                c: *count,
                z: *last,
            },
            UsageRecord::Refusal {
                at,
                product,
                license_id,
                customer,
                vm,
                code,
                message,
                count,
            } => WireRecord::Refusal {
                a: *at,
                p: self.party(product, license_id, customer),
                v: self.vm(vm),
                c: code.clone(),
                m: message.clone(),
                n: *count,
            },
            UsageRecord::CloneReport {
                at,
                product,
                customer,
                vm,
                other_vm,
                refused,
                detail,
            } => WireRecord::CloneReport {
                a: *at,
                p: self.party(product, "", customer),
                v: self.vm(vm),
                o: other_vm.as_ref().map(|o| self.vm(o)),
                f: *refused,
                d: detail.clone(),
            },
            UsageRecord::PoolSeat {
                at,
                lease,
                pool,
                fallback,
                moved_from,
                seats,
            } => WireRecord::PoolSeat {
                a: *at,
                l: self.lease(lease),
                o: pool.clone(),
                f: *fallback,
                m: moved_from.clone(),
                s: *seats,
            },
            UsageRecord::PoolReconcile {
                at,
                pool,
                fallback_registered,
                over_granted,
                reregistered,
                released,
                lost,
            } => WireRecord::PoolReconcile {
                a: *at,
                o: pool.clone(),
                f: fallback_registered.clone(),
                x: over_granted.clone(),
                n: reregistered.clone(),
                r: released.clone(),
                z: lost.clone(),
            },
            UsageRecord::RecordsDropped { at, count, reason } => WireRecord::RecordsDropped {
                a: *at,
                c: *count,
                r: reason.clone(),
            },
            UsageRecord::UncleanStop {
                at,
                since,
                flush_secs,
            } => WireRecord::UncleanStop {
                a: *at,
                s: *since,
                f: *flush_secs,
            },
        }
    }
}

impl From<BlockBody> for WireBody {
    fn from(b: BlockBody) -> WireBody {
        let mut bb = BodyBuilder::new(&b.host_id);
        for r in &b.records {
            let w = bb.intern(r);
            bb.wire.records.push(w);
        }
        bb.wire
    }
}

impl TryFrom<WireBody> for BlockBody {
    type Error = String;

    fn try_from(w: WireBody) -> Result<BlockBody, String> {
        let vm = |i: u32| {
            w.vms
                .get(i as usize)
                .cloned()
                .ok_or_else(|| format!("VM index {i} outside the block's table"))
        };
        let party = |i: u32| {
            w.parties
                .get(i as usize)
                .ok_or_else(|| format!("party index {i} outside the block's table"))
        };
        let lease = |i: u32| -> Result<LeaseRef, String> {
            let l = w
                .leases
                .get(i as usize)
                .ok_or_else(|| format!("lease index {i} outside the block's table"))?;
            let p = party(l.party)?;
            Ok(LeaseRef {
                lease_id: l.id.clone(),
                product: p.product.clone(),
                license_id: p.license_id.clone(),
                customer: p.customer.clone(),
                vm: vm(l.vm)?,
            })
        };
        let mut records = Vec::with_capacity(w.records.len());
        for r in &w.records {
            records.push(match r {
                WireRecord::LeaseStart { a, l, s } => UsageRecord::LeaseStart {
                    at: *a,
                    lease: lease(*l)?,
                    scope: s.clone(),
                },
                WireRecord::LeaseRenew { a, l } => UsageRecord::LeaseRenew {
                    at: *a,
                    lease: lease(*l)?,
                },
                WireRecord::LeaseEnd { a, l, r } => UsageRecord::LeaseEnd {
                    at: *a,
                    lease: lease(*l)?,
                    reason: r.clone(),
                },
                WireRecord::TokenIssued { a, l, c, z } => UsageRecord::TokenIssued {
                    at: *a,
                    lease: lease(*l)?,
                    count: *c,
                    last: *z,
                },
                WireRecord::Refusal { a, p, v, c, m, n } => {
                    let p = party(*p)?;
                    UsageRecord::Refusal {
                        at: *a,
                        product: p.product.clone(),
                        license_id: p.license_id.clone(),
                        customer: p.customer.clone(),
                        vm: vm(*v)?,
                        code: c.clone(),
                        message: m.clone(),
                        count: *n,
                    }
                }
                WireRecord::CloneReport { a, p, v, o, f, d } => {
                    let p = party(*p)?;
                    UsageRecord::CloneReport {
                        at: *a,
                        product: p.product.clone(),
                        customer: p.customer.clone(),
                        vm: vm(*v)?,
                        other_vm: o.map(vm).transpose()?,
                        refused: *f,
                        detail: d.clone(),
                    }
                }
                WireRecord::PoolSeat { a, l, o, f, m, s } => UsageRecord::PoolSeat {
                    at: *a,
                    lease: lease(*l)?,
                    pool: o.clone(),
                    fallback: *f,
                    moved_from: m.clone(),
                    seats: *s,
                },
                WireRecord::PoolReconcile {
                    a,
                    o,
                    f,
                    x,
                    n,
                    r,
                    z,
                } => UsageRecord::PoolReconcile {
                    at: *a,
                    pool: o.clone(),
                    fallback_registered: f.clone(),
                    over_granted: x.clone(),
                    reregistered: n.clone(),
                    released: r.clone(),
                    lost: z.clone(),
                },
                WireRecord::RecordsDropped { a, c, r } => UsageRecord::RecordsDropped {
                    at: *a,
                    count: *c,
                    reason: r.clone(),
                },
                WireRecord::UncleanStop { a, s, f } => UsageRecord::UncleanStop {
                    at: *a,
                    since: *s,
                    flush_secs: *f,
                },
            });
        }
        Ok(BlockBody {
            host_id: w.host_id,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::MAX_BODY;
    use proptest::prelude::*;

    fn lease(i: u32, vm: u32) -> LeaseRef {
        LeaseRef {
            lease_id: format!("0b8f6c52-3a4e-4d7e-9a8b-{i:012}"),
            product: "cad-suite".into(),
            license_id: "L-2026-0042".into(),
            customer: "ACME Engineering".into(),
            vm: VmRef {
                uuid: format!("6f1c1c8e-0a1d-4d4e-9a53-{vm:012}"),
                name: format!("workstation-{vm}"),
            },
        }
    }

    fn churn(i: u32) -> [UsageRecord; 3] {
        let l = lease(i, i % 8);
        let at = 1_800_000_000 + u64::from(i);
        [
            UsageRecord::LeaseStart {
                at,
                lease: l.clone(),
                scope: "vm".into(),
            },
            UsageRecord::token(at, l.clone()),
            UsageRecord::LeaseEnd {
                at: at + 1,
                lease: l,
                reason: "released by the guest".into(),
            },
        ]
    }

    fn cbor(b: &BlockBody) -> Vec<u8> {
        let mut v = Vec::new();
        ciborium::into_writer(b, &mut v).unwrap();
        v
    }

    #[test]
    fn a_full_block_of_short_leases_holds_several_times_the_named_records() {
        let mut b = BodyBuilder::new(&"ab".repeat(32));
        'fill: for i in 0.. {
            for r in churn(i) {
                if b.push(r, MAX_BODY).is_err() {
                    break 'fill;
                }
            }
        }
        let n = b.len();
        let size = b.size();
        let body = b.finish();
        let bytes = cbor(&body);
        assert_eq!(bytes.len(), size, "the builder's size is exact");
        assert!(size <= MAX_BODY);
        // with a lease's identity written per record, a block held ~17 records
        assert!(n >= 60, "only {n} records fit");
        let back: BlockBody = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn a_record_that_does_not_fit_leaves_the_body_as_it_was() {
        let mut b = BodyBuilder::new("h");
        for r in churn(0) {
            b.push(r, MAX_BODY).unwrap();
        }
        let before = (b.size(), b.len(), b.wire.clone());
        let r = churn(1)[0].clone();
        assert_eq!(b.push(r.clone(), before.0 + 10), Err(Box::new(r)));
        assert_eq!(
            (b.size(), b.len(), &b.wire),
            (before.0, before.1, &before.2)
        );
        assert_eq!(cbor(&b.finish()).len(), before.0);
    }

    #[test]
    fn indices_outside_the_tables_are_an_error_not_a_panic() {
        let mut w = WireBody::from(BlockBody {
            host_id: "h".into(),
            records: churn(0).to_vec(),
        });
        w.leases[0].vm = 7;
        let e = BlockBody::try_from(w.clone()).unwrap_err();
        assert!(e.contains("VM index 7"), "{e}");
        w.leases.clear();
        let e = BlockBody::try_from(w).unwrap_err();
        assert!(e.contains("lease index 0"), "{e}");
    }

    fn record() -> impl Strategy<Value = UsageRecord> {
        let s = || "[a-z0-9-]{0,12}";
        let vm = (s(), s()).prop_map(|(uuid, name)| VmRef { uuid, name });
        let lease = (s(), s(), s(), s(), vm.clone()).prop_map(
            |(lease_id, product, license_id, customer, vm)| LeaseRef {
                lease_id,
                product,
                license_id,
                customer,
                vm,
            },
        );
        prop_oneof![
            (any::<u64>(), lease.clone(), s())
                .prop_map(|(at, lease, scope)| { UsageRecord::LeaseStart { at, lease, scope } }),
            (any::<u64>(), lease.clone())
                .prop_map(|(at, lease)| UsageRecord::LeaseRenew { at, lease }),
            (any::<u64>(), lease.clone(), s())
                .prop_map(|(at, lease, reason)| { UsageRecord::LeaseEnd { at, lease, reason } }),
            (
                any::<u64>(),
                lease.clone(),
                1u64..1_000_000,
                any::<Option<u64>>()
            )
                .prop_map(|(at, lease, count, last)| UsageRecord::TokenIssued {
                    at,
                    lease,
                    count,
                    last
                }),
            (
                any::<u64>(),
                s(),
                s(),
                s(),
                vm.clone(),
                (s(), s()),
                1u64..1_000_000
            )
                .prop_map(
                    |(at, product, license_id, customer, vm, (code, message), count)| {
                        UsageRecord::Refusal {
                            at,
                            product,
                            license_id,
                            customer,
                            vm,
                            code,
                            message,
                            count,
                        }
                    }
                ),
            (
                any::<u64>(),
                s(),
                s(),
                vm.clone(),
                proptest::option::of(vm),
                any::<bool>(),
                s()
            )
                .prop_map(|(at, product, customer, vm, other_vm, refused, detail)| {
                    UsageRecord::CloneReport {
                        at,
                        product,
                        customer,
                        vm,
                        other_vm,
                        refused,
                        detail,
                    }
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(at, count)| UsageRecord::RecordsDropped {
                at,
                count,
                reason: String::new()
            }),
            (any::<u64>(), s()).prop_map(|(at, reason)| UsageRecord::RecordsDropped {
                at,
                count: 1,
                reason
            }),
            (lease, any::<u64>(), s(), any::<bool>(), s(), any::<u32>()).prop_map(
                |(lease, at, pool, fallback, moved_from, seats)| UsageRecord::PoolSeat {
                    at,
                    lease,
                    pool,
                    fallback,
                    moved_from,
                    seats,
                }
            ),
            (
                any::<u64>(),
                s(),
                proptest::collection::vec(s(), 0..3),
                proptest::collection::vec(s(), 0..3),
                proptest::collection::vec(s(), 0..3),
                (
                    proptest::collection::vec(s(), 0..3),
                    proptest::collection::vec(s(), 0..3)
                )
            )
                .prop_map(
                    |(
                        at,
                        pool,
                        fallback_registered,
                        over_granted,
                        reregistered,
                        (released, lost),
                    )| {
                        UsageRecord::PoolReconcile {
                            at,
                            pool,
                            fallback_registered,
                            over_granted,
                            reregistered,
                            released,
                            lost,
                        }
                    }
                ),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(at, since, flush_secs)| {
                UsageRecord::UncleanStop {
                    at,
                    since,
                    flush_secs,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn any_records_round_trip_and_the_size_is_exact(
            rs in proptest::collection::vec(record(), 0..60)
        ) {
            let mut b = BodyBuilder::new("host");
            for r in rs {
                let _ = b.push(r, MAX_BODY);
            }
            let size = b.size();
            let body = b.finish();
            let bytes = cbor(&body);
            prop_assert_eq!(bytes.len(), size);
            prop_assert!(size <= MAX_BODY);
            let back: BlockBody = ciborium::from_reader(&bytes[..]).unwrap();
            prop_assert_eq!(back, body);
        }
    }
}
