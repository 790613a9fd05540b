//! Golden fixtures: the exact JSON of each frame. If one of these tests
//! fails, the wire format changed — that breaks deployed edges and
//! dashboards, so change the fixture only together with a protocol version.

use ems_shared::{dashboard_frame, decode_reading, DashboardReading, HubFrame, Reading};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim_end()
        .to_string()
}

const NOW: i64 = 1_764_000_000_000;

#[test]
fn full_reading_decodes_and_reencodes_byte_for_byte() {
    let text = fixture("reading_full.json");
    let r = decode_reading(&text, NOW).unwrap();
    assert_eq!(r.reactive_power_var, Some(120.5));
    assert_eq!(r.to_json(), text);
}

#[test]
fn minimal_reading_reencodes_byte_for_byte() {
    let text = fixture("reading_minimal.json");
    let r = decode_reading(&text, NOW).unwrap();
    let built = Reading {
        meter: "pv-1".into(),
        power_w: Some(-1200.0),
        ..Default::default()
    };
    assert_eq!(r, built);
    assert_eq!(built.to_json(), text);
}

#[test]
fn hub_frames_match_fixtures() {
    let ack = HubFrame::Ack { epoch: 1_764_000_000_123, seq: 42 };
    assert_eq!(ack.to_json(), fixture("ack.json"));
    let rejected: HubFrame = serde_json::from_str(&fixture("rejected.json")).unwrap();
    assert!(matches!(rejected, HubFrame::Rejected { seq: 43, .. }));
    assert_eq!(rejected.to_json(), fixture("rejected.json"));
}

#[test]
fn dashboard_frame_matches_fixture() {
    let raw = fixture("reading_minimal.json");
    let frame = dashboard_frame(&raw, "ems_001", 1_764_000_000_456);
    assert_eq!(frame, fixture("dashboard_reading.json"));
    let d: DashboardReading = serde_json::from_str(&frame).unwrap();
    assert_eq!((d.device_id.as_str(), d.rx_ms), ("ems_001", 1_764_000_000_456));
}
