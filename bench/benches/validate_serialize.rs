//! The hub's per-reading hot path: validate (`decode_reading`) and build the
//! dashboard frame once (`dashboard_frame`).
//!
//! `CARGO_TARGET_DIR=… cargo bench -p ems-bench --bench validate_serialize`

use divan::black_box;

const READING: &str = "{\"type\":\"reading\",\"epoch\":1764000000123,\"seq\":123456,\"ts_ms\":1764000000000,\
\"meter\":\"main\",\"voltage_v\":231.27,\"current_a\":4.176,\"power_w\":960.52,\"energy_wh\":1523400.25,\
\"frequency_hz\":50.012,\"power_factor\":0.981,\"reactive_power_var\":120.55}";

const NOW_MS: i64 = 1_764_000_000_500;

fn main() {
    divan::main();
}

#[divan::bench]
fn decode_reading() -> ems_shared::Reading {
    ems_shared::decode_reading(black_box(READING), NOW_MS).expect("valid reading")
}

#[divan::bench]
fn decode_edge_frame() -> ems_shared::EdgeFrame {
    ems_shared::decode_edge_frame(black_box(READING), NOW_MS).expect("valid frame")
}

#[divan::bench]
fn dashboard_frame() -> String {
    ems_shared::dashboard_frame(black_box(READING), black_box("dev-00042"), NOW_MS)
}

#[divan::bench]
fn validate_then_serialize() -> (ems_shared::Reading, String) {
    let text = black_box(READING);
    let r = ems_shared::decode_reading(text, NOW_MS).expect("valid reading");
    let f = ems_shared::dashboard_frame(text, "dev-00042", NOW_MS);
    (r, f)
}

#[divan::bench]
fn ack_frame() -> String {
    ems_shared::HubFrame::Ack {
        epoch: black_box(1_764_000_000_123),
        seq: black_box(123_456),
    }
    .to_json()
}
