//! Test harness of the hub's integration tests: the shared test kit
//! (`ems-testkit`) under the names the tests use — start/stop a hub,
//! provision devices and viewers, connect clients, read frames.

pub use ems_testkit::fixtures::{free_port, now_ms, reading, SOON};
pub use ems_testkit::http::{bearer, http, HttpResp};
pub use ems_testkit::hub::TestHub;
pub use ems_testkit::require::{require_or_skip, Feature};
pub use ems_testkit::ws::{
    browser_dashboard, connect, connect_with, expect_close, next_json, next_msg, next_reading,
    refused_status, send_text, wait_ack, Client,
};
