//! Counts over the in-memory mirror for admission (libvirt reservations): one pass, nothing
//! copied, under the mirror's lock only (no commit is waited for).

use super::Ledger;

impl Ledger {
    /// For each VM of `vms` (UUIDs), its leases of `product` live at `now`, in one pass over
    /// the mirror without copying it.
    pub fn live_leases_of(&self, vms: &[&str], product: &str, now: u64) -> Vec<usize> {
        let mut n = vec![0usize; vms.len()];
        let mem = self.lock();
        for l in mem
            .leases
            .values()
            .filter(|l| l.product == product && l.expires_at > now)
        {
            if let Some(i) = vms.iter().position(|v| *v == l.vm_uuid) {
                n[i] += 1;
            }
        }
        n
    }
}
