//! The usage log end to end: a scripted workload sealed block by block, then tampered with in
//! every way the reader must name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::keys::VendorKey;
use crate::signed::fmt_time;
use proptest::prelude::*;
use rand_core::OsRng;
use sha2::{Digest, Sha256};

const T0: u64 = 1_767_225_000; // 2025-12-31T23:50:00Z

fn secret() -> MeteringSecret {
    MeteringSecret::from_ikm(b"test metering key material, 32b+")
}

fn lease(id: &str, vm: &str, product: &str) -> LeaseRef {
    LeaseRef {
        lease_id: id.into(),
        product: product.into(),
        license_id: "L1".into(),
        customer: "ACME".into(),
        vm: VmRef {
            uuid: format!("uuid-{vm}"),
            name: vm.into(),
        },
    }
}

struct Writer {
    seq: u64,
    prev: [u8; 32],
    nv: u64,
    clock: u64,
    wall: u64,
    out: Vec<Vec<u8>>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            seq: 0,
            prev: [0; 32],
            nv: 41,
            clock: 50_000_000,
            wall: T0,
            out: Vec::new(),
        }
    }
    /// Seals a block at wall time `wall` (TPM clock advances in step).
    fn seal(&mut self, wall: u64, records: Vec<UsageRecord>) {
        self.clock += (wall - self.wall) * 1000;
        self.wall = wall;
        self.nv += 1;
        let h = BlockHeader {
            seq: self.seq,
            prev: self.prev,
            nv: self.nv,
            tpm: TpmClock {
                clock: self.clock,
                reset_count: 3,
                restart_count: 0,
            },
            wall,
            key_id: [0; 8],
        };
        let body = BlockBody {
            host_id: "aa".repeat(32),
            records,
        };
        let b = seal_block(&h, &body, secret().public(), &mut OsRng).unwrap();
        assert_eq!(b.len(), BLOCK_SIZE);
        self.prev = block_hash(&b);
        self.seq += 1;
        self.out.push(b);
    }
    fn bytes(&self) -> Vec<u8> {
        self.out.concat()
    }
}

/// The scripted workload: two VMs, one lease across midnight, tokens, a refusal.
fn workload() -> Writer {
    let mut w = Writer::new();
    let a = lease("l-a", "vm1", "cad");
    let b = lease("l-b", "vm2", "cad");
    w.seal(
        T0 + 60,
        vec![
            UsageRecord::LeaseStart {
                at: T0 + 10,
                lease: a.clone(),
                scope: "vm".into(),
            },
            UsageRecord::token(T0 + 10, a.clone()),
            UsageRecord::LeaseStart {
                at: T0 + 20,
                lease: b.clone(),
                scope: "process".into(),
            },
            UsageRecord::token(T0 + 20, b.clone()),
        ],
    );
    w.seal(
        T0 + 120,
        vec![
            UsageRecord::LeaseRenew {
                at: T0 + 70,
                lease: a.clone(),
            },
            // three tokens counted into one record
            UsageRecord::TokenIssued {
                at: T0 + 70,
                lease: a.clone(),
                count: 3,
                last: Some(T0 + 75),
            },
            UsageRecord::LeaseEnd {
                at: T0 + 80,
                lease: b.clone(),
                reason: "released by the guest".into(),
            },
            UsageRecord::Refusal {
                at: T0 + 90,
                product: "cad".into(),
                license_id: "L1".into(),
                customer: "ACME".into(),
                vm: VmRef {
                    uuid: "uuid-vm3".into(),
                    name: "vm3".into(),
                },
                code: "seats_exhausted".into(),
                message: "no seat".into(),
                count: 1,
            },
        ],
    );
    // midnight is T0 + 600; lease a ends at T0 + 900
    w.seal(
        T0 + 960,
        vec![UsageRecord::LeaseEnd {
            at: T0 + 900,
            lease: a,
            reason: "expired".into(),
        }],
    );
    w.seal(T0 + 1020, vec![]);
    w
}

fn kinds(r: &UsageReport) -> Vec<AnomalyKind> {
    let mut k: Vec<_> = r.anomalies.iter().map(|a| a.kind).collect();
    k.dedup();
    k
}

fn row<'a>(r: &'a UsageReport, day: &str, vm: &str) -> &'a UsageRow {
    r.usage
        .iter()
        .find(|u| u.day == day && u.vm_name == vm)
        .unwrap_or_else(|| panic!("no row {day} {vm}: {:#?}", r.usage))
}

#[test]
fn clean_log_reports_exact_totals() {
    let w = workload();
    let r = read_log(&w.bytes(), &secret(), DEFAULT_CLOCK_TOLERANCE_SECS);
    assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
    assert_eq!((r.blocks, r.blocks_opened, r.records), (4, 4, 9));
    assert_eq!(r.open_leases, 0);
    let a1 = row(&r, "2025-12-31", "vm1");
    assert_eq!((a1.lease_seconds, a1.leases, a1.tokens), (590, 1, 4));
    let a2 = row(&r, "2026-01-01", "vm1");
    assert_eq!((a2.lease_seconds, a2.leases, a2.tokens), (300, 0, 0));
    let b = row(&r, "2025-12-31", "vm2");
    assert_eq!((b.lease_seconds, b.leases, b.tokens), (60, 1, 1));
    let c = row(&r, "2025-12-31", "vm3");
    assert_eq!((c.lease_seconds, c.refusals), (0, 1));
    assert_eq!(r.usage.len(), 4);
    assert!(r
        .usage
        .iter()
        .all(|u| u.customer == "ACME" && u.product == "cad"));
}

#[test]
fn renewal_recorded_after_its_lease_ended_does_not_reopen_it() {
    // A renewal and a release of one lease pipelined on one connection: the proxy can meter
    // the renewal after the end. The lease ended; billing it to the end of the log would
    // charge the customer for a lease nobody held.
    let mut w = Writer::new();
    let x = lease("x", "vm1", "cad");
    w.seal(
        T0 + 60,
        vec![
            UsageRecord::LeaseStart {
                at: T0 + 10,
                lease: x.clone(),
                scope: "vm".into(),
            },
            UsageRecord::LeaseEnd {
                at: T0 + 30,
                lease: x.clone(),
                reason: "released by the guest".into(),
            },
            UsageRecord::LeaseRenew {
                at: T0 + 30,
                lease: x.clone(),
            },
        ],
    );
    w.seal(T0 + 1000, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(r.open_leases, 0);
    assert_eq!(row(&r, "2025-12-31", "vm1").lease_seconds, 20);
}

#[test]
fn open_lease_counts_until_end_of_log() {
    let mut w = Writer::new();
    w.seal(
        T0 + 60,
        vec![UsageRecord::LeaseStart {
            at: T0 + 10,
            lease: lease("x", "vm1", "cad"),
            scope: "vm".into(),
        }],
    );
    w.seal(T0 + 100, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(r.open_leases, 1);
    assert_eq!(row(&r, "2025-12-31", "vm1").lease_seconds, 90);
}

#[test]
fn altered_byte_is_named() {
    let mut w = workload();
    w.out[1][2000] ^= 1;
    let r = read_log(&w.bytes(), &secret(), 60);
    // the damaged block is named; its number then shows as a gap too
    assert_eq!(
        r.anomalies[0].kind,
        AnomalyKind::AlteredBlock,
        "{:#?}",
        r.anomalies
    );
    assert_eq!(r.anomalies[0].index, Some(1));
    assert!(r.anomalies[1..]
        .iter()
        .all(|a| a.kind == AnomalyKind::MissingBlocks && a.detail.contains("block 1 ")));
}

#[test]
fn altered_header_with_fixed_checksum_fails_decryption() {
    let mut w = workload();
    let b = &mut w.out[2];
    b[76..84].copy_from_slice(&(T0 + 900).to_be_bytes()); // wall time
    let h = Sha256::digest(&b[..BLOCK_SIZE - TRAILER_SIZE]);
    b[BLOCK_SIZE - TRAILER_SIZE..].copy_from_slice(&h);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(
        kinds(&r).contains(&AnomalyKind::AlteredBlock),
        "{:#?}",
        r.anomalies
    );
    assert!(r
        .anomalies
        .iter()
        .any(|a| a.detail.contains("does not decrypt")));
}

#[test]
fn replaced_block_breaks_the_chain() {
    let w = workload();
    // a forger can encrypt to the public key: re-seal block 1 with fewer records
    let mut forged = Writer::new();
    forged.seal(T0 + 60, vec![]);
    forged.prev = block_hash(&w.out[0]);
    forged.nv = 42;
    forged.seal(T0 + 120, vec![]);
    let mut out = w.out.clone();
    out[1] = forged.out[1].clone();
    let r = read_log(&out.concat(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::AlteredBlock],
        "{:#?}",
        r.anomalies
    );
    assert!(r.anomalies[0].detail.contains("does not link to block 1"));
}

#[test]
fn missing_block_is_named() {
    let mut w = workload();
    w.out.remove(1);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(
        kinds(&r).contains(&AnomalyKind::MissingBlocks),
        "{:#?}",
        r.anomalies
    );
    assert!(r
        .anomalies
        .iter()
        .any(|a| a.detail == "block 1 is missing or unreadable"));
    // a missing first block too
    let mut w = workload();
    w.out.remove(0);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::MissingBlocks],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn reordered_blocks_are_named() {
    let mut w = workload();
    w.out.swap(1, 2);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::ReorderedBlocks],
        "{:#?}",
        r.anomalies
    );
    // totals are still right: records are taken in block-number order
    assert_eq!(row(&r, "2025-12-31", "vm1").lease_seconds, 590);
    let mut w = workload();
    let dup = w.out[1].clone();
    w.out.push(dup);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::ReorderedBlocks],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn nv_counter_rollback_is_named() {
    let mut w = workload();
    w.nv = 10;
    w.seal(T0 + 1080, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::NvCounterRolledBack],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn blocks_sealed_together_share_one_counter_step() {
    let mut w = workload();
    // a group of three blocks: one TPM clock reading, one counter value
    w.seal(T0 + 1080, vec![]);
    w.nv -= 1;
    w.seal(T0 + 1080, vec![]);
    w.nv -= 1;
    w.seal(T0 + 1080, vec![]);
    w.seal(T0 + 1140, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
    assert_eq!(r.blocks, 8);
    // the same counter value with another clock reading is not one group
    w.nv -= 1;
    w.seal(T0 + 1200, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::NvCounterRolledBack],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn restored_older_log_is_named() {
    // blocks 2.. were sealed, then the log was restored to blocks 0..1 and the proxy went on:
    // its next block has the next sequence number but the TPM counter kept counting
    let full = workload();
    let mut w = Writer::new();
    w.seal(T0 + 60, vec![]);
    w.seal(T0 + 120, vec![]);
    let restored_prefix = w.out.clone();
    w.nv += 2; // the two blocks sealed after the backup and lost
    w.seal(T0 + 1080, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::LogRolledBack],
        "{:#?}",
        r.anomalies
    );
    assert!(
        r.anomalies[0].detail.contains("2 group(s) of blocks"),
        "{}",
        r.anomalies[0].detail
    );
    assert_eq!(restored_prefix.len(), 2);
    assert_eq!(full.out.len(), 4);
}

#[test]
fn clock_backwards_and_jumps_are_named() {
    let mut w = workload();
    w.clock -= 10_000_000;
    w.seal(T0 + 1080, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::ClockBackwards],
        "{:#?}",
        r.anomalies
    );

    let mut w = workload();
    w.wall = T0 + 1020 - 3600; // wall clock set back an hour
    w.clock -= 3_600_000; // keep the TPM honest: it advances by the seal() step only
    w.clock += 3_600_000;
    let h = w.wall;
    w.seal(h + 60, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(
        kinds(&r).contains(&AnomalyKind::ClockBackwards),
        "{:#?}",
        r.anomalies
    );

    let mut w = workload();
    w.clock -= 7200 * 1000; // TPM advances 60 s while the wall clock jumps 2 h + 60 s
    w.seal(T0 + 1020 + 7260, vec![]);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::ClockJump],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn tpm_clock_stepping_back_across_an_unorderly_reset_is_a_note() {
    let mut w = workload();
    let last = BlockHeader::decode(w.out.last().unwrap()).unwrap();
    let body = BlockBody {
        host_id: "aa".repeat(32),
        records: vec![],
    };
    let prev = block_hash(w.out.last().unwrap());
    let next = |back: u64, reset: u32| {
        let mut h = last;
        h.seq += 1;
        h.prev = prev;
        h.nv += 1;
        h.tpm.clock -= back;
        h.tpm.reset_count = reset;
        h.wall += 60;
        seal_block(&h, &body, secret().public(), &mut OsRng).unwrap()
    };
    // swtpm killed and started again: its clock restarts from its last save
    let b = next(400, last.tpm.reset_count + 1);
    w.out.push(b);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
    assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
    // but not by more than a TPM can lose, and never without a reset
    let mut w2 = workload();
    w2.out.push(next(
        MAX_CLOCK_LOSS_ON_RESET_MS + 1,
        last.tpm.reset_count + 1,
    ));
    let r = read_log(&w2.bytes(), &secret(), 60);
    assert!(
        kinds(&r).contains(&AnomalyKind::ClockBackwards),
        "{:#?}",
        r.anomalies
    );
    let mut w3 = workload();
    w3.out.push(next(400, last.tpm.reset_count));
    let r = read_log(&w3.bytes(), &secret(), 60);
    assert!(
        kinds(&r).contains(&AnomalyKind::ClockBackwards),
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn reboot_is_a_note_not_an_anomaly() {
    let mut w = workload();
    // host powered off for an hour: TPM clock stood still, resetCount went up
    w.clock -= 3600 * 1000;
    let mut h = BlockHeader {
        seq: w.seq,
        prev: w.prev,
        nv: w.nv + 1,
        tpm: TpmClock {
            clock: w.clock + 3_660_000 - 3_600_000,
            reset_count: 4,
            restart_count: 0,
        },
        wall: T0 + 1020 + 3660,
        key_id: [0; 8],
    };
    h.tpm.clock = 50_000_000 + 1020 * 1000 + 60_000;
    let b = seal_block(
        &h,
        &BlockBody {
            host_id: "aa".repeat(32),
            records: vec![],
        },
        secret().public(),
        &mut OsRng,
    )
    .unwrap();
    w.out.push(b);
    let r = read_log(&w.bytes(), &secret(), 60);
    assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
    assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
    // resetCount going down is not explained by a reboot
    let mut w = workload();
    let mut h = BlockHeader::decode(&w.out[3]).unwrap();
    h.seq = 4;
    h.prev = block_hash(&w.out[3]);
    h.nv += 1;
    h.tpm.reset_count = 1;
    h.tpm.clock += 60_000;
    h.wall += 60;
    let body = BlockBody {
        host_id: "aa".repeat(32),
        records: vec![],
    };
    w.out
        .push(seal_block(&h, &body, secret().public(), &mut OsRng).unwrap());
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::TpmResetCountDecreased],
        "{:#?}",
        r.anomalies
    );
}

#[test]
fn clone_reports_and_dropped_records_are_listed() {
    let mut w = workload();
    w.seal(
        T0 + 1080,
        vec![
            UsageRecord::CloneReport {
                at: T0 + 1030,
                product: "cad".into(),
                customer: "ACME".into(),
                vm: VmRef {
                    uuid: "u1".into(),
                    name: "vm1".into(),
                },
                other_vm: Some(VmRef {
                    uuid: "u9".into(),
                    name: "vm9".into(),
                }),
                refused: false,
                detail: "ephemeral-id chains fork".into(),
            },
            UsageRecord::RecordsDropped {
                at: T0 + 1040,
                count: 3,
                reason: String::new(),
            },
        ],
    );
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::Clone, AnomalyKind::RecordsDropped],
        "{:#?}",
        r.anomalies
    );
    assert!(r.anomalies[0].detail.contains("vm9"));
}

#[test]
fn unclean_stop_is_named_with_its_window() {
    let mut w = workload();
    w.seal(
        T0 + 1080,
        vec![UsageRecord::UncleanStop {
            at: T0 + 1070,
            since: T0 + 1000,
            flush_secs: 60,
        }],
    );
    let r = read_log(&w.bytes(), &secret(), 60);
    assert_eq!(
        kinds(&r),
        vec![AnomalyKind::UncleanStop],
        "{:#?}",
        r.anomalies
    );
    let d = &r.anomalies[0].detail;
    assert!(
        d.contains(&fmt_time(T0 + 1000)) && d.contains(&fmt_time(T0 + 1070)),
        "{d}"
    );
    assert!(d.contains("60 s"), "{d}");
}

#[test]
fn wrong_key_and_partial_block_are_named() {
    let w = workload();
    let other = MeteringSecret::from_ikm(b"another vendor's metering key!!!");
    let r = read_log(&w.bytes(), &other, 60);
    assert!(kinds(&r).iter().all(|k| *k == AnomalyKind::WrongKey));
    assert_eq!(r.anomalies.len(), 4);
    assert_eq!(r.records, 0);
    let mut b = w.bytes();
    b.extend_from_slice(&[0u8; 100]);
    let r = read_log(&b, &secret(), 60);
    assert_eq!(kinds(&r), vec![AnomalyKind::PartialBlock]);
    assert_eq!(r.records, 9);
}

#[test]
fn clear_header_shows_no_usage_data() {
    // Values long enough (>= 12 bytes) that random ciphertext cannot
    // contain them by chance; short ones like "L1" appear in 16 KiB of
    // random bytes about one time in four.
    let lease = LeaseRef {
        lease_id: "lease-7f3a9c1e".into(),
        product: "cad-suite-professional".into(),
        license_id: "license-2026-0042".into(),
        customer: "ACME Engineering GmbH".into(),
        vm: VmRef {
            uuid: "6f1c2d3e-4b5a-4978-8a1b-2c3d4e5f6a7b".into(),
            name: "build-server-east".into(),
        },
    };
    let mut w = Writer::new();
    w.seal(
        T0 + 60,
        vec![
            UsageRecord::LeaseStart {
                at: T0 + 10,
                lease: lease.clone(),
                scope: "vm".into(),
            },
            UsageRecord::token(T0 + 10, lease.clone()),
        ],
    );
    let b = w.bytes();
    let r = read_log(&b, &secret(), 60);
    assert_eq!(r.records, 2, "the block must hold the records searched for");
    for needle in [
        &lease.lease_id,
        &lease.product,
        &lease.license_id,
        &lease.customer,
        &lease.vm.uuid,
        &lease.vm.name,
    ] {
        assert!(
            !b.windows(needle.len()).any(|x| x == needle.as_bytes()),
            "{needle:?} readable in the log"
        );
    }
}

#[test]
fn metering_key_is_deterministic_per_vendor_key() {
    let v = VendorKey::generate().unwrap();
    let a = MeteringSecret::from_vendor(&v);
    let b = MeteringSecret::from_vendor(&VendorKey::from_pkcs8(v.pkcs8()).unwrap());
    assert_eq!(a.public().to_bytes(), b.public().to_bytes());
    let c = MeteringSecret::from_vendor(&VendorKey::generate().unwrap());
    assert_ne!(a.public().to_bytes(), c.public().to_bytes());
    assert!(MeteringKey::from_bytes(&[1u8; 31]).is_err());
}

#[test]
fn oversized_body_is_refused() {
    let big = UsageRecord::Refusal {
        at: 1,
        product: "p".repeat(MAX_BODY),
        license_id: String::new(),
        customer: String::new(),
        vm: VmRef::default(),
        code: String::new(),
        message: String::new(),
        count: 1,
    };
    let h = BlockHeader::decode(&workload().out[0]).unwrap();
    let body = BlockBody {
        host_id: String::new(),
        records: vec![big],
    };
    assert!(matches!(
        seal_block(&h, &body, secret().public(), &mut OsRng),
        Err(UsageError::TooLarge { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any single changed byte anywhere in the log is named as an altered block.
    #[test]
    fn any_flipped_byte_is_detected(pos in 0usize..4 * BLOCK_SIZE, bit in 0u8..8) {
        let w = workload();
        let mut b = w.bytes();
        b[pos] ^= 1 << bit;
        let r = read_log(&b, &secret(), 60);
        prop_assert!(r.anomalies.iter().any(|a| a.kind == AnomalyKind::AlteredBlock
            && a.index == Some(pos / BLOCK_SIZE)), "{:#?}", r.anomalies);
    }

    /// Dropping any block or swapping any two is named (missing or reordered).
    #[test]
    fn dropped_or_swapped_blocks_are_detected(i in 0usize..4, j in 0usize..4, drop in any::<bool>()) {
        let mut w = workload();
        if drop {
            if i == 3 { return Ok(()); } // the tail can only be caught by the NV counter
            w.out.remove(i);
        } else {
            if i == j { return Ok(()); }
            w.out.swap(i, j);
        }
        let r = read_log(&w.bytes(), &secret(), 60);
        let want = if drop { AnomalyKind::MissingBlocks } else { AnomalyKind::ReorderedBlocks };
        prop_assert!(r.anomalies.iter().any(|a| a.kind == want), "{:#?}", r.anomalies);
    }
}

fn hold(host: &str, vm: &str, from: u64, to: u64) -> PoolHold {
    PoolHold {
        pool: "p".into(),
        seats: 1,
        host: host.into(),
        vm: vm.into(),
        from,
        to,
    }
}

#[test]
fn pool_peaks_count_vms_at_once_across_hosts_and_flag_only_real_over_use() {
    // A VM migrating A -> B (both hold its seat for a moment) and a seat handed from one VM to
    // the next in the same second: one VM at a time, no anomaly.
    let ok = [
        hold("A", "vm1", T0, T0 + 60),
        hold("B", "vm1", T0 + 50, T0 + 100),
        hold("B", "vm2", T0 + 100, T0 + 200),
    ];
    let (peaks, anomalies) = pool_peaks(&ok.iter().collect::<Vec<_>>());
    assert_eq!(peaks.len(), 1);
    assert_eq!(peaks[0].peak_vms, 1);
    assert_eq!(peaks[0].seats, Some(1));
    assert!(anomalies.is_empty(), "{anomalies:?}");
    // Two VMs on two hosts at once in a 1-seat pool (each host's log alone shows one).
    let over = [
        hold("A", "vm1", T0, T0 + 60),
        hold("B", "vm2", T0 + 30, T0 + 90),
    ];
    let (peaks, anomalies) = pool_peaks(&over.iter().collect::<Vec<_>>());
    assert_eq!(peaks[0].peak_vms, 2);
    assert_eq!(peaks[0].at, T0 + 30);
    assert_eq!(peaks[0].hosts, vec!["A".to_string(), "B".to_string()]);
    assert_eq!(anomalies.len(), 1);
    assert_eq!(anomalies[0].kind, AnomalyKind::PoolOverUse);
    assert!(anomalies[0]
        .detail
        .contains("2 VMs held seats of pool 'p' at once"));
    for one in &over {
        let (_, a) = pool_peaks(&[one]);
        assert!(a.is_empty());
    }
    // A seat handed between hosts whose clocks are a second apart: not held twice.
    let handover = [
        hold("A", "vm1", T0, T0 + 60),
        hold("B", "vm2", T0 + 59, T0 + 100),
    ];
    let (peaks, anomalies) = pool_peaks(&handover.iter().collect::<Vec<_>>());
    assert_eq!(peaks[0].peak_vms, 1);
    assert!(anomalies.is_empty(), "{anomalies:?}");
    // A pool shrunk by a new license (2 -> 1 seat) counts from then, not by the largest size.
    let shrunk = [
        PoolHold {
            seats: 2,
            ..hold("A", "vm1", T0, T0 + 100)
        },
        PoolHold {
            seats: 2,
            ..hold("B", "vm2", T0 + 10, T0 + 40)
        },
        hold("B", "vm3", T0 + 50, T0 + 100),
    ];
    let (_, anomalies) = pool_peaks(&shrunk.iter().collect::<Vec<_>>());
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert!(
        anomalies[0].detail.contains("the pool had 1"),
        "{anomalies:?}"
    );
    // Logs of an older proxy (no pool size): a peak, no verdict.
    let unknown = [hold("A", "vm1", T0, T0 + 9), hold("B", "vm2", T0, T0 + 9)]
        .map(|h| PoolHold { seats: 0, ..h });
    let (peaks, anomalies) = pool_peaks(&unknown.iter().collect::<Vec<_>>());
    assert_eq!((peaks[0].peak_vms, peaks[0].seats), (2, None));
    assert!(anomalies.is_empty());
}
