//! Fuzzes `decode_frame`: any input must give Ok or a typed error, never a panic, and whatever
//! decodes must re-encode to a frame that decodes to the same message.
#![no_main]

use ciborium::Value;
use hostbind_attest::wire::{decode_frame, encode_frame, Body, Validate, WireError};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as a frame of `B`; with `round_trip`, re-encodes what decoded and compares.
fn check<B>(data: &[u8], round_trip: bool)
where
    B: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug,
{
    match decode_frame::<B>(data) {
        Ok(Some((msg, used))) => {
            assert!(used >= 4 && used <= data.len());
            if !round_trip {
                return;
            }
            let again = encode_frame(&msg).expect("a decoded message re-encodes");
            let (back, n) = decode_frame::<B>(&again)
                .expect("a re-encoded message decodes")
                .expect("a re-encoded frame is complete");
            assert_eq!(n, again.len());
            assert_eq!(back, msg);
        }
        Ok(None) => {}
        Err(
            WireError::FrameTooLarge { .. }
            | WireError::UnsupportedVersion { .. }
            | WireError::Malformed { .. },
        ) => {}
        Err(e) => panic!("decode returned an encoder-side error: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Body>(data, true);
    // Raw values may hold NaN floats, which are never equal to themselves: no round-trip check.
    check::<Value>(data, false);
});
