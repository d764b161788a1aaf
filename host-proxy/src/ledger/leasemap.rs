//! The mirror's leases with counts kept as they change, so the request path asks "how many
//! leases of this product / of this VM" without a pass over every lease (issue 19's profile: a
//! scan per renewal was the largest cost at 1,000 guests).
//!
//! The counts include leases past their expiry that the sweep has not removed yet, so they are
//! an upper bound of the live counts: a caller uses them to skip an exact count when the bound
//! already answers (e.g. fewer leases of a product than seats means a free seat in any count
//! mode), never to refuse.

use super::Lease;
use std::collections::HashMap;

/// Leases by id, with per-product and per-VM counts. Only `insert` and `remove` change it, so
/// the counts cannot drift from the map.
#[derive(Default)]
pub(super) struct LeaseMap {
    map: HashMap<String, Lease>,
    by_product: HashMap<String, usize>,
    /// VMs holding at least one lease of a product, per product.
    vms_of_product: HashMap<String, usize>,
    /// Per VM UUID: (leases of every product, leases per product).
    by_vm: HashMap<String, (usize, HashMap<String, usize>)>,
}

impl LeaseMap {
    pub(super) fn new(leases: HashMap<String, Lease>) -> LeaseMap {
        let mut m = LeaseMap::default();
        for (_, l) in leases {
            m.insert(l);
        }
        m
    }

    /// Adds `l`, replacing a lease with its id.
    pub(super) fn insert(&mut self, l: Lease) {
        if let Some(old) = self.map.remove(&l.id) {
            self.uncount(&old);
        }
        *self.by_product.entry(l.product.clone()).or_default() += 1;
        let vm = self.by_vm.entry(l.vm_uuid.clone()).or_default();
        vm.0 += 1;
        let n = vm.1.entry(l.product.clone()).or_default();
        *n += 1;
        if *n == 1 {
            *self.vms_of_product.entry(l.product.clone()).or_default() += 1;
        }
        self.map.insert(l.id.clone(), l);
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Lease> {
        let l = self.map.remove(id)?;
        self.uncount(&l);
        Some(l)
    }

    fn uncount(&mut self, l: &Lease) {
        if let Some(n) = self.by_product.get_mut(&l.product) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_product.remove(&l.product);
            }
        }
        if let Some(vm) = self.by_vm.get_mut(&l.vm_uuid) {
            vm.0 = vm.0.saturating_sub(1);
            if let Some(n) = vm.1.get_mut(&l.product) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    vm.1.remove(&l.product);
                    if let Some(v) = self.vms_of_product.get_mut(&l.product) {
                        *v = v.saturating_sub(1);
                        if *v == 0 {
                            self.vms_of_product.remove(&l.product);
                        }
                    }
                }
            }
            if vm.0 == 0 {
                self.by_vm.remove(&l.vm_uuid);
            }
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<&Lease> {
        self.map.get(id)
    }

    pub(super) fn contains_key(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Lease> {
        self.map.values()
    }

    /// Leases of `product` (expired ones not swept yet included).
    pub(super) fn of_product(&self, product: &str) -> usize {
        self.by_product.get(product).copied().unwrap_or(0)
    }

    /// Seats `product` could use at most in `mode` (expired leases not swept included): its
    /// leases, or the VMs holding them. The exact count is at most this.
    pub(super) fn seats_bound(&self, product: &str, mode: super::CountMode) -> usize {
        match mode {
            super::CountMode::Vm => self.vms_of_product.get(product).copied().unwrap_or(0),
            _ => self.of_product(product),
        }
    }

    /// Leases of `vm_uuid`: (of every product, of `product`), expired ones not swept included.
    pub(super) fn of_vm(&self, vm_uuid: &str, product: &str) -> (usize, usize) {
        self.by_vm.get(vm_uuid).map_or((0, 0), |(all, per)| {
            (*all, per.get(product).copied().unwrap_or(0))
        })
    }

    /// Every lease (expired ones not swept included).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(id: u8, vm: u8, product: u8) -> Lease {
        Lease {
            id: format!("l{id}"),
            vm_uuid: format!("vm{vm}"),
            vm_name: format!("vm{vm}"),
            product: format!("p{product}"),
            license_id: "lic".into(),
            features: Vec::new(),
            scope: super::super::LeaseScope::Vm,
            pid: None,
            pid_start: None,
            created_at: 0,
            renewed_at: 0,
            expires_at: 100,
        }
    }

    proptest! {
        /// Whatever the order of inserts, replacements and removals, the counts equal a count
        /// over the map.
        #[test]
        fn counts_always_match_a_full_count(ops in proptest::collection::vec((any::<bool>(), 0u8..12, 0u8..4, 0u8..3), 0..200)) {
            let mut m = LeaseMap::default();
            for (add, id, vm, product) in ops {
                if add { m.insert(lease(id, vm, product)); } else { m.remove(&format!("l{id}")); }
            }
            for p in 0..3u8 {
                let p = format!("p{p}");
                prop_assert_eq!(m.of_product(&p), m.values().filter(|l| l.product == p).count());
                for v in 0..4u8 {
                    let v = format!("vm{v}");
                    let all = m.values().filter(|l| l.vm_uuid == v).count();
                    let of = m.values().filter(|l| l.vm_uuid == v && l.product == p).count();
                    prop_assert_eq!(m.of_vm(&v, &p), (all, of));
                }
            }
            prop_assert_eq!(m.by_product.values().sum::<usize>(), m.len());
            for p in 0..3u8 {
                let p = format!("p{p}");
                let vms: std::collections::HashSet<&str> = m.values().filter(|l| l.product == p).map(|l| l.vm_uuid.as_str()).collect();
                prop_assert_eq!(m.seats_bound(&p, super::super::CountMode::Vm), vms.len());
            }
        }
    }
}
