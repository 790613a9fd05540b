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
    let ack = HubFrame::Ack {
        epoch: 1_764_000_000_123,
        seq: 42,
    };
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
    assert_eq!(
        (d.device_id.as_str(), d.rx_ms),
        ("ems_001", 1_764_000_000_456)
    );
}

#[test]
fn status_frame_matches_fixture() {
    use ems_shared::{decode_edge_frame, EdgeFrame, EdgeStatus};
    let text = fixture("status.json");
    let built = EdgeStatus {
        outbox_depth: 10_800,
        oldest_ts_ms: Some(NOW - 10_800_000),
        dropped: 0,
        ..Default::default()
    };
    assert_eq!(built.to_json(), text);
    assert_eq!(
        decode_edge_frame(&text, NOW).unwrap(),
        EdgeFrame::Status(built.clone())
    );
    assert_eq!(built.behind_ms(NOW), 3 * 3_600_000);
    // A reading still goes through the same entry point unchanged.
    let reading = fixture("reading_full.json");
    assert!(matches!(
        decode_edge_frame(&reading, NOW),
        Ok(EdgeFrame::Reading(_))
    ));
}

#[test]
fn status_frame_with_loss_counters_matches_fixture() {
    use ems_shared::{decode_edge_frame, EdgeFrame, EdgeStatus};
    let text = fixture("status_degraded.json");
    let built = EdgeStatus {
        outbox_depth: 10_800,
        oldest_ts_ms: Some(NOW - 10_800_000),
        dropped: 2,
        unwritten: 120,
        dropped_disk_full: 4000,
        dropped_damaged: 1,
        ..Default::default()
    };
    assert_eq!(built.to_json(), text);
    assert_eq!(
        decode_edge_frame(&text, NOW).unwrap(),
        EdgeFrame::Status(built)
    );
}

#[test]
fn dashboard_control_frames_match_fixtures() {
    use ems_shared::DashboardFrame;
    let status = DashboardFrame::Status {
        device_id: "ems_001".into(),
        online: true,
        last_seen_ms: Some(NOW),
        outbox_depth: None,
        behind_ms: None,
        losses: None,
    };
    assert_eq!(status.to_json(), fixture("dashboard_status.json"));
    let replay_end = DashboardFrame::ReplayEnd {
        device_id: "ems_001".into(),
        since_ms: NOW - 3_600_000,
        count: 3600,
        truncated: false,
    };
    assert_eq!(replay_end.to_json(), fixture("replay_end.json"));
    let backfill = DashboardFrame::Backfill {
        device_id: "ems_001".into(),
        count: 1200,
        from_ts_ms: NOW - 10_800_000,
        to_ts_ms: NOW - 9_600_000,
    };
    assert_eq!(backfill.to_json(), fixture("backfill.json"));
    for (name, f) in [
        ("dashboard_status.json", status),
        ("replay_end.json", replay_end),
        ("backfill.json", backfill),
    ] {
        assert_eq!(
            serde_json::from_str::<DashboardFrame>(&fixture(name)).unwrap(),
            f,
            "{name}"
        );
    }
}
