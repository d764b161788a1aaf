//! Decoding hostile frames must not allocate much more than the frame, nor recurse without bound.
//!
//! This file has its own global allocator that records the peak of live heap bytes, and a single
//! test so no other test's allocations are counted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ciborium::Value;
use hostbind_attest::wire::{decode_frame, Body, WireError, MAX_FRAME_BODY};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the counters are atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's `layout` meets `alloc`'s contract (non-zero size), passed as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout` (alloc above forwards to
        // it), as dealloc's caller guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak extra heap bytes used while decoding `frame`, and the result.
fn peak_during(frame: &[u8]) -> (usize, Result<(), WireError>) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = decode_frame::<Body>(frame).map(|_| ());
    (PEAK.load(Ordering::SeqCst) - base, r)
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// `{"v": 1, "id": 5, "body": {"hello": <inner>}}` followed by `tail` raw bytes.
fn wrap(inner: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    ciborium::into_writer(
        &Value::Map(vec![
            (Value::Text("v".into()), Value::Integer(1.into())),
            (Value::Text("id".into()), Value::Integer(5.into())),
        ]),
        &mut b,
    )
    .unwrap();
    b[0] = 0xa3; // the map has three entries; the third follows raw
    b.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y']);
    b.extend_from_slice(&[0xa1, 0x65, b'h', b'e', b'l', b'l', b'o']);
    b.extend_from_slice(inner);
    b.extend_from_slice(tail);
    frame_of(&b)
}

fn assert_malformed(name: &str, frame: &[u8], max_peak: usize) {
    assert!(
        frame.len() <= MAX_FRAME_BODY + 4,
        "{name}: test frame too big"
    );
    let (peak, r) = peak_during(frame);
    match r {
        Err(WireError::Malformed { .. }) => {}
        other => panic!("{name}: expected Malformed, got {other:?}"),
    }
    assert!(
        peak <= max_peak,
        "{name}: decoding a {}-byte frame peaked at {peak} heap bytes",
        frame.len()
    );
    println!("{name}: {} byte frame, peak {peak} heap bytes", frame.len());
}

#[test]
fn hostile_frames_stay_small() {
    const LIMIT: usize = 4 << 20; // 4 MiB, far below any bomb's claimed size

    // Length headers claiming 4 GiB / 2^64 items inside a tiny frame.
    let huge32 = [0xff, 0xff, 0xff, 0xff];
    let huge64 = [0xff; 8];
    for (name, major) in [
        ("byte string", 0x40u8),
        ("text string", 0x60),
        ("array", 0x80),
        ("map", 0xa0),
    ] {
        let mut h = vec![major | 26];
        h.extend_from_slice(&huge32);
        assert_malformed(
            &format!("{name} claiming 4 GiB"),
            &wrap(&h, &[0; 100]),
            LIMIT,
        );
        let mut h = vec![major | 27];
        h.extend_from_slice(&huge64);
        assert_malformed(
            &format!("{name} claiming 2^64"),
            &wrap(&h, &[0; 100]),
            LIMIT,
        );
        // The same at the top level of the frame body.
        let mut h = vec![major | 27];
        h.extend_from_slice(&huge64);
        assert_malformed(
            &format!("top-level {name} claiming 2^64"),
            &frame_of(&h),
            LIMIT,
        );
    }

    // A claimed 2^64-entry `features` list where the typed decoder expects one (serde may
    // preallocate from the claim; it must stay capped).
    let mut req = vec![0xa1, 0x6d];
    req.extend_from_slice(b"token_request");
    req.extend_from_slice(&[0xa6, 0x67]);
    req.extend_from_slice(b"product");
    req.extend_from_slice(&[0x61, b'p', 0x68]);
    req.extend_from_slice(b"features");
    req.push(0x9b);
    req.extend_from_slice(&huge64);
    req.extend_from_slice(&[0x61, b'f'].repeat(50));
    let mut b = Vec::new();
    ciborium::into_writer(
        &Value::Map(vec![
            (Value::Text("v".into()), Value::Integer(1.into())),
            (Value::Text("id".into()), Value::Integer(5.into())),
        ]),
        &mut b,
    )
    .unwrap();
    b[0] = 0xa3;
    b.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y']);
    b.extend_from_slice(&req);
    assert_malformed("features claiming 2^64", &frame_of(&b), LIMIT);

    // A whole frame of nested arrays: must hit the nesting limit, not the stack.
    let deep = vec![0x81u8; MAX_FRAME_BODY];
    assert_malformed("nested arrays", &frame_of(&deep), LIMIT);
    let deep = vec![0x9fu8; MAX_FRAME_BODY]; // indefinite-length arrays
    assert_malformed("nested indefinite arrays", &frame_of(&deep), LIMIT);
    let deep = vec![0xc6u8; MAX_FRAME_BODY]; // tags
    assert_malformed("nested tags", &frame_of(&deep), LIMIT);
    let deep: Vec<u8> = [0xa1u8, 0x00].repeat(MAX_FRAME_BODY / 2); // maps {0: {0: ...}}
    assert_malformed("nested maps", &frame_of(&deep), LIMIT);
    assert_malformed("nested inside body", &wrap(&[0x81; 60000], &[]), LIMIT);

    // Many small items: the value tree is bounded by the frame size.
    let mut many = vec![0x9f];
    many.extend(std::iter::repeat_n(0xf6, MAX_FRAME_BODY - 200));
    many.push(0xff);
    assert_malformed("64k nulls in a hello", &wrap(&many, &[]), 8 << 20);
    let mut strings = vec![0x9f];
    strings.extend(std::iter::repeat_n(0x60, MAX_FRAME_BODY - 200));
    strings.push(0xff);
    assert_malformed("64k empty strings", &wrap(&strings, &[]), 8 << 20);

    // Indefinite-length byte string of many 1-byte chunks.
    let mut chunks = vec![0x5f];
    for _ in 0..(MAX_FRAME_BODY - 200) / 2 {
        chunks.extend_from_slice(&[0x41, 0x00]);
    }
    chunks.push(0xff);
    assert_malformed("chunked byte string", &wrap(&chunks, &[]), LIMIT);
}
