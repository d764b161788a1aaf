//! What a license covers of the leases that run: when a license is replaced by a narrower one
//! (fewer seats, fewer features, a shorter validity, another count mode) or stops being valid,
//! the leases it no longer covers end at once (see `Service::apply_license`), and a renewal
//! of a lease beyond the current license's seats is refused. Pure functions over the leases.

use crate::ledger::Lease;
use hostbind_attest::signed::{fmt_time, CountMode, License, Window};
use std::collections::{BTreeMap, HashSet};

/// The live leases (of `leases`, any product) that are beyond `seats` for `product` counted in
/// `mode`: the oldest keep their seats. Access mode keeps the `seats` oldest leases; vm mode
/// keeps every lease of the `seats` VMs whose oldest lease is oldest; none counts nothing.
pub fn over_seats<'a>(
    leases: &'a [Lease],
    product: &str,
    seats: u32,
    mode: CountMode,
    now: u64,
) -> Vec<&'a Lease> {
    let mut live: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.product == product && l.expires_at > now)
        .collect();
    live.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let seats = seats as usize;
    match mode {
        CountMode::None => Vec::new(),
        CountMode::Access => live.into_iter().skip(seats).collect(),
        CountMode::Vm => {
            // VMs in the order of their oldest lease.
            let mut first: BTreeMap<&str, usize> = BTreeMap::new();
            for (i, l) in live.iter().enumerate() {
                first.entry(l.vm_uuid.as_str()).or_insert(i);
            }
            let mut order: Vec<(usize, &str)> = first.into_iter().map(|(v, i)| (i, v)).collect();
            order.sort_unstable();
            let kept: HashSet<&str> = order.into_iter().take(seats).map(|(_, v)| v).collect();
            live.into_iter()
                .filter(|l| !kept.contains(l.vm_uuid.as_str()))
                .collect()
        }
    }
}

/// The leases of `lic`'s product that `lic` does not cover at `now`, each with the reason
/// (for the history, the usage log and the event the VM gets): every one when the license is
/// not valid now; those holding a feature it does not grant; those beyond its seats.
pub fn uncovered<'a>(leases: &'a [Lease], lic: &License, now: u64) -> Vec<(&'a Lease, String)> {
    let mine = leases.iter().filter(|l| l.product == lic.product);
    match lic.validity.check(now) {
        Window::Valid => {}
        Window::Expired => {
            let why = format!(
                "license {} for '{}' ended at {}",
                lic.id,
                lic.product,
                fmt_time(lic.validity.not_after)
            );
            return mine.map(|l| (l, why.clone())).collect();
        }
        Window::NotYetValid => {
            let why = format!(
                "license {} for '{}' is not valid before {}",
                lic.id,
                lic.product,
                fmt_time(lic.validity.not_before)
            );
            return mine.map(|l| (l, why.clone())).collect();
        }
    }
    let mut out: Vec<(&Lease, String)> = Vec::new();
    let mut gone = HashSet::new();
    for l in mine {
        if let Some(f) = l.features.iter().find(|f| !lic.features.contains(f)) {
            gone.insert(l.id.as_str());
            out.push((
                l,
                format!(
                    "license {} for '{}' does not grant feature '{f}' any more",
                    lic.id, lic.product
                ),
            ));
        }
    }
    let rest: Vec<Lease> = leases
        .iter()
        .filter(|l| !gone.contains(l.id.as_str()))
        .cloned()
        .collect();
    // A pool license's own `seats` is the fallback share (what this node may grant alone while
    // cut off from the pool); the seats its leases hold are counted cluster-wide by the pool, so
    // no more of them can run here than the whole pool has.
    let seats = match lic.pool() {
        Some(p) if crate::ports::is_pool_license(lic) => p.seats,
        _ => lic.seats,
    };
    let over: HashSet<String> = over_seats(&rest, &lic.product, seats, lic.count_mode, now)
        .into_iter()
        .map(|l| l.id.clone())
        .collect();
    for l in leases.iter().filter(|l| over.contains(&l.id)) {
        out.push((
            l,
            format!(
                "license {} for '{}' grants {} seat{} ({} count) and older leases hold {}",
                lic.id,
                lic.product,
                seats,
                if seats == 1 { "" } else { "s" },
                lic.count_mode,
                if seats == 1 { "it" } else { "them" }
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::LeaseScope;
    use hostbind_attest::signed::{ClonePolicy, Validity};

    fn lease(id: &str, vm: &str, product: &str, features: &[&str], created: u64) -> Lease {
        Lease {
            id: id.into(),
            vm_uuid: vm.into(),
            vm_name: vm.into(),
            product: product.into(),
            license_id: "L1".into(),
            features: features.iter().map(|f| f.to_string()).collect(),
            scope: LeaseScope::Vm,
            pid: None,
            pid_start: None,
            created_at: created,
            renewed_at: created,
            expires_at: 1_000,
        }
    }

    fn lic(seats: u32, mode: CountMode, features: &[&str], nb: u64, na: u64) -> License {
        License {
            id: "L2".into(),
            customer: "ACME".into(),
            product: "cad".into(),
            features: features.iter().map(|f| f.to_string()).collect(),
            hosts: vec![],
            seats,
            count_mode: mode,
            clone_policy: ClonePolicy::Observe,
            grace_secs: 0,
            issued_at: 0,
            validity: Validity {
                not_before: nb,
                not_after: na,
            },
            metering_key: None,
            pool: None,
        }
    }

    fn ids(v: &[(&Lease, String)]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|(l, _)| l.id.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn fewer_seats_end_the_newest_leases_per_count_mode() {
        let ls = vec![
            lease("a1", "a", "cad", &[], 10),
            lease("b1", "b", "cad", &[], 11),
            lease("a2", "a", "cad", &[], 12),
            lease("c1", "c", "cad", &[], 13),
            lease("s1", "c", "sim", &[], 1),
        ];
        // vm mode, 2 seats: VMs a and b keep theirs (a both of its leases), c loses its.
        let u = uncovered(&ls, &lic(2, CountMode::Vm, &[], 0, 2_000), 100);
        assert_eq!(ids(&u), vec!["c1"]);
        assert!(u[0].1.contains("grants 2 seats (vm count)"), "{}", u[0].1);
        // access mode, 2 seats: the two oldest leases stay.
        let u = uncovered(&ls, &lic(2, CountMode::Access, &[], 0, 2_000), 100);
        assert_eq!(ids(&u), vec!["a2", "c1"]);
        // none: nothing counted.
        assert!(uncovered(&ls, &lic(0, CountMode::None, &[], 0, 2_000), 100).is_empty());
        // Expired leases hold no seat.
        assert!(over_seats(&ls, "cad", 0, CountMode::Access, 1_000).is_empty());
    }

    #[test]
    fn missing_features_and_validity_end_leases_and_free_their_seats() {
        let ls = vec![
            lease("a1", "a", "cad", &["pro"], 10),
            lease("b1", "b", "cad", &[], 11),
            lease("c1", "c", "cad", &["basic"], 12),
        ];
        // "pro" is gone: a1 ends for it, and its seat goes to the next oldest (b1, c1 stay).
        let u = uncovered(&ls, &lic(2, CountMode::Vm, &["basic"], 0, 2_000), 100);
        assert_eq!(ids(&u), vec!["a1"]);
        assert!(u[0].1.contains("feature 'pro'"), "{}", u[0].1);
        // Not valid now: all end.
        let u = uncovered(&ls, &lic(9, CountMode::Vm, &["pro", "basic"], 0, 50), 100);
        assert_eq!(ids(&u).len(), 3);
        assert!(u[0].1.contains("ended at"), "{}", u[0].1);
        let u = uncovered(
            &ls,
            &lic(9, CountMode::Vm, &["pro", "basic"], 500, 900),
            100,
        );
        assert!(u[0].1.contains("not valid before"), "{}", u[0].1);
        // A wider license covers everything.
        assert!(uncovered(
            &ls,
            &lic(3, CountMode::Access, &["pro", "basic"], 0, 2_000),
            100
        )
        .is_empty());
    }
}
