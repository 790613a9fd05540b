//! The gatekeeper: every text frame a device sends goes through
//! `ems_shared::decode_edge_frame` (reading or status). It must never
//! panic, a valid frame must re-encode to an equal frame, the dashboard
//! splice of a valid reading must be JSON, and an error's detail must stay
//! bounded (it goes into logs and `rejected` frames).
#![no_main]

use ems_shared::{decode_edge_frame, decode_reading, EdgeFrame};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_764_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_edge_frame(text, NOW) {
        Ok(EdgeFrame::Reading(r)) => {
            let again = decode_reading(&r.to_json(), NOW).expect("re-encoded reading must decode");
            assert_eq!(again, r);
            let d = ems_shared::dashboard_frame(text, "dev", NOW);
            let v: serde_json::Value = serde_json::from_str(&d).expect("dashboard frame must be JSON");
            assert_eq!(v["device_id"], "dev");
        }
        Ok(EdgeFrame::Status(s)) => {
            let again = decode_edge_frame(&s.to_json(), NOW).expect("re-encoded status must decode");
            assert_eq!(again, EdgeFrame::Status(s));
        }
        Err(e) => assert!(e.detail.len() <= 164, "unbounded detail: {}", e.detail.len()),
    }
});
