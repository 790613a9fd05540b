//! The dashboard page end to end in a real headless Chromium, driven over
//! WebDriver (chromedriver + fantoccini): a viewer pastes a token, picks
//! up the device list, and a reading a test device sends shows up on the
//! page. A screenshot is kept at `target/ems-dashboard.png` (and copied to
//! `docs/dashboard.png` for the README when that is missing or
//! `EMS_UPDATE_SCREENSHOT=1`).
//!
//! Needs Debian's `chromium` and `chromium-driver`. When they are missing
//! the test prints a loud SKIP and passes — unless `EMS_REQUIRE_BROWSER=1`
//! (CI), where it fails (`ems_testkit::require`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};

use crate::harness::*;

/// Kills chromedriver (and its browser) when the test ends, however.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

fn skip(why: &str) {
    require_or_skip(Feature::Browser, why);
}

/// The workspace target dir (CARGO_TARGET_DIR or `<workspace>/target`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

async fn wait_for_text(c: &fantoccini::Client, css: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(want) {
                    return t;
                }
                last = t;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{css} never showed {want:?} (last: {last:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_a_live_reading_in_headless_chromium() {
    let Some(chromium) = find(&[
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]) else {
        return skip("chromium is not installed");
    };
    let Some(chromedriver) = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
    else {
        return skip("chromedriver (chromium-driver) is not installed");
    };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let hub = TestHub::start().await;
    let token = hub.add_device("ems_001");
    let viewer = hub.add_viewer("wall", &["ems_001"]);
    // A little history, so the chart has a line before the live reading.
    let mut dev = hub.device("ems_001", &token).await;
    // One refused reading (quarantined before the readings after it are
    // acked) for the page's quarantine counts.
    send_text(
        &mut dev,
        r#"{"type":"reading","epoch":2,"seq":0,"ts_ms":1,"meter":"main","power_factor":2.0}"#,
    )
    .await;
    let t0 = now_ms() - 20 * 60_000;
    for i in 0..40i64 {
        let p = 900.0 + 300.0 * ((i as f64) / 5.0).sin();
        send_text(
            &mut dev,
            format!(
                r#"{{"type":"reading","epoch":1,"seq":{i},"ts_ms":{},"meter":"main","voltage_v":{:.1},"current_a":{:.2},"power_w":{p:.1},"energy_wh":{}}}"#,
                t0 + i * 30_000,
                230.0 + 1.5 * ((i as f64) / 7.0).cos(),
                p / 230.0,
                1_000_000 + i * 8
            ),
        )
        .await;
    }
    wait_ack(&mut dev, 1, 39).await;

    let port = free_port();
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let _driver = match child {
        Ok(c) => Driver(c),
        Err(e) => return skip(&format!("chromedriver does not start: {e}")),
    };
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }
    }))
    .unwrap();
    // chromedriver needs a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match ClientBuilder::rustls()
            .expect("rustls WebDriver client")
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("cannot start a WebDriver session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    let admin = hub.admin().add_admin("ops").unwrap();
    let result = drive(&client, &hub, &mut dev, &viewer, &admin).await;
    let _ = client.close().await;
    result.unwrap();
}

async fn drive(
    c: &fantoccini::Client,
    hub: &TestHub,
    dev: &mut Client,
    viewer: &str,
    admin: &str,
) -> Result<(), fantoccini::error::CmdError> {
    c.goto(&format!("http://{}/", hub.addr)).await?;
    // Paste the viewer token once.
    let input = c.wait().for_element(Locator::Css("#token")).await?;
    input.send_keys(viewer).await?;
    c.find(Locator::Css("#save-token")).await?.click().await?;
    // The device list shows the device online (the only one: auto-selected).
    wait_for_text(c, "#devices", "ems_001").await;
    wait_for_text(c, "#dev-state", "online").await;
    // A live reading from the test device appears on the page.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 40u64;
    loop {
        send_text(
            dev,
            format!(
                r#"{{"type":"reading","epoch":1,"seq":{seq},"ts_ms":{},"meter":"main","voltage_v":231.4,"current_a":5.37,"power_w":1234.5,"energy_wh":1000400}}"#,
                now_ms()
            ),
        )
        .await;
        seq += 1;
        let shown = c.find(Locator::Css("#v-power")).await?.text().await?;
        if shown.contains("1234.5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live reading never appeared (power shows {shown:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_text(c, "#v-voltage", "231.4").await;
    // The device's quarantine count, and the losses its edge reports.
    wait_for_text(c, "#devices", "1 quarantined").await;
    send_text(
        dev,
        r#"{"type":"status","outbox_depth":0,"oldest_ts_ms":null,"dropped":2,"unwritten":3,"dropped_disk_full":4,"dropped_damaged":5}"#,
    )
    .await;
    let losses = wait_for_text(c, "#dev-losses", "2 dropped (spool full)").await;
    for part in [
        "4 dropped (disk full)",
        "5 lost (damaged spool records)",
        "3 held in memory",
        "1 refused by the hub (quarantined)",
    ] {
        assert!(losses.contains(part), "{part:?} not in {losses:?}");
    }
    wait_for_text(c, "#v-energy", "kWh").await;
    // The token never reached a URL.
    assert!(!c.current_url().await?.as_str().contains(viewer));
    // Let the chart draw, then keep a screenshot.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let png = c.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let dir = target_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("ems-dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    // The README's copy: written when missing, or refreshed on request
    // (EMS_UPDATE_SCREENSHOT=1), so a test run does not dirty the tree.
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
    let refresh = std::env::var("EMS_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
    if docs.parent().is_some_and(|p| p.is_dir()) && (refresh || !docs.exists()) {
        let _ = std::fs::write(&docs, &png);
    }
    println!("screenshot: {}", shot.display());
    // Usable on a phone: the same view at a phone's width.
    c.set_window_size(390, 844).await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    std::fs::write(dir.join("ems-dashboard-phone.png"), c.screenshot().await?).unwrap();
    c.set_window_size(1100, 900).await?;

    // The admin view: create a device; its env-file line is shown once and
    // the new token works at once.
    c.find(Locator::Css("#tab-admin")).await?.click().await?;
    let input = c.wait().for_element(Locator::Css("#admin-token")).await?;
    input.send_keys(admin).await?;
    c.find(Locator::Css("#admin-login button"))
        .await?
        .click()
        .await?;
    wait_for_text(c, "#admin-devices", "ems_001").await;
    wait_for_text(c, "#admin-devices td.quarantined", "1").await;
    c.find(Locator::Css("#new-device"))
        .await?
        .send_keys("ems_002")
        .await?;
    c.find(Locator::Css("#add-device button"))
        .await?
        .click()
        .await?;
    let line = wait_for_text(c, "#secret-text", "EMS_DEVICE_TOKEN=emsd_").await;
    let new_token = line
        .trim()
        .trim_start_matches("EMS_DEVICE_TOKEN=")
        .to_string();
    let mut d2 = hub.device("ems_002", &new_token).await;
    send_text(&mut d2, crate::harness::reading(1, 0)).await;
    wait_ack(&mut d2, 1, 0).await;
    wait_for_text(c, "#admin-devices", "ems_002").await;
    let png = c.screenshot().await?;
    std::fs::write(dir.join("ems-admin.png"), &png).unwrap();
    Ok(())
}
