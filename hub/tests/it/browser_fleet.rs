//! The fleet overview page in a real headless Chromium (same driver and
//! skip-or-fail rule as [`crate::browser`]): a thousand provisioned
//! devices render as rows, an online device shows online, sorting, the
//! filter and a status update work, and a click opens the device's live
//! view. The page measures its own render time (`performance.now()`, up to
//! the frame after the rows are built) and the test prints it. Keeps a
//! screenshot at `target/ems-dashboard-fleet.png` (copied to
//! `docs/dashboard-fleet.png` when missing or `EMS_UPDATE_SCREENSHOT=1`).
//!
//! Also the first run: the demo script's own setup (`scripts/demo.sh` with
//! `EMS_DEMO_SETUP_ONLY=1`) provisions the database and writes the viewer
//! token file; the hub serves that database, `demo-1` connects with the
//! demo's device token, and the page opened with the token from the file
//! shows `demo-1` online in the fleet view.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client as WebDriver, Locator};

use crate::browser::{
    away_from_midnight, browser_binaries, page_str, target_dir, wait_for_text, Browser,
};
use crate::harness::*;

/// Runs `script` until it returns `true`, or panics naming `what`.
async fn wait_js(c: &WebDriver, script: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.execute(script, vec![]).await.unwrap();
        if v.as_bool() == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what} ({script})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The device ids of the shown rows, in order (the first `n`).
async fn shown(c: &WebDriver, n: usize) -> Vec<String> {
    let v = c
        .execute(
            &format!(
                "return Array.from(document.querySelectorAll('#fleet-rows tr'))\
                 .slice(0, {n}).map(function (tr) {{ return tr.dataset.device; }})"
            ),
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// A cell of a device's row.
async fn cell(c: &WebDriver, device: &str, class: &str) -> String {
    page_str(
        c,
        &format!(
            "var r = document.querySelector('#fleet-rows tr[data-device=\"{device}\"] td.{class}');\
             return r ? r.textContent : ''"
        ),
    )
    .await
}

/// Replaces the filter text (input events as a user's typing fires).
async fn filter(c: &WebDriver, text: &str) -> Result<(), fantoccini::error::CmdError> {
    let input = c.find(Locator::Css("#fleet-filter")).await?;
    input.clear().await?;
    c.execute(
        "var f = document.getElementById('fleet-filter'); f.value = '';\
         f.dispatchEvent(new Event('input'));",
        vec![],
    )
    .await?;
    if !text.is_empty() {
        input.send_keys(text).await?;
    }
    Ok(())
}

/// Pastes the viewer token into the page's form.
async fn log_in(c: &WebDriver, token: &str) -> Result<(), fantoccini::error::CmdError> {
    let input = c.wait().for_element(Locator::Css("#token")).await?;
    // The empty form says where a token comes from.
    let help = c.find(Locator::Css("#token-help")).await?.text().await?;
    assert!(
        help.contains("ems-hub viewer add NAME --all-devices")
            && help.contains("demo/viewer-token"),
        "{help}"
    );
    input.send_keys(token).await?;
    c.find(Locator::Css("#save-token")).await?.click().await?;
    Ok(())
}

const DEVICES: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_page_renders_a_thousand_devices() {
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
    let hub = TestHub::start().await;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:04}")).collect();
    let mut tokens = Vec::new();
    {
        let mut admin = hub.admin();
        for id in &ids {
            tokens.push(admin.add_device(id).unwrap());
        }
    }
    let viewer = hub
        .admin()
        .add_viewer("wall", ems_hub::store::ViewerScope::AllDevices)
        .unwrap();
    // Two devices online with readings from the last minutes.
    let (a, b) = ("dev-0007", "dev-0512");
    let mut dev_a = hub.device(a, &tokens[7]).await;
    let mut dev_b = hub.device(b, &tokens[512]).await;
    // "Today" is the browser's UTC day: readings of the last 90 s and the
    // page's look at them fall in one day, or the run waits for a new one.
    away_from_midnight(
        &jiff::tz::TimeZone::UTC,
        Duration::from_secs(180),
        Duration::from_secs(100),
    )
    .await;
    let now = now_ms();
    for (dev, wh0) in [(&mut dev_a, 5_000.0), (&mut dev_b, 90_000.0)] {
        for i in 0..10u64 {
            send_text(
                dev,
                format!(
                    r#"{{"type":"reading","epoch":1,"seq":{i},"ts_ms":{},"meter":"main","power_w":1200.0,"energy_wh":{}}}"#,
                    now - 90_000 + i as i64 * 10_000,
                    wh0 + i as f64 * 50.0
                ),
            )
            .await;
        }
        wait_ack(dev, 1, 9).await;
    }

    let Some(browser) = Browser::launch(&chromium, &chromedriver, Some("UTC"), None).await else {
        return;
    };
    let c = &browser.client;
    let result = async {
        c.goto(&format!("http://{}/#fleet", hub.addr)).await?;
        log_in(c, &viewer).await?;
        // Every device appears (the hub picks up the devices added behind
        // its back at its next token poll).
        wait_js(
            c,
            &format!(
                "return document.querySelectorAll('#fleet-rows tr').length === {DEVICES} \
                 && !!document.getElementById('fleet-table').dataset.renderMs"
            ),
            "all rows",
        )
        .await;
        let timing = |key: &str| {
            format!("return document.getElementById('fleet-table').dataset.{key} || ''")
        };
        let ms: f64 = page_str(c, &timing("renderMs")).await.parse().unwrap();
        let build = page_str(c, &timing("buildMs")).await;
        println!(
            "fleet page: {DEVICES} rows rendered in {ms} ms to the next frame \
             ({build} ms building the rows; performance.now in the page)"
        );
        assert!(ms < 10_000.0, "{ms} ms");
        assert!(!c.current_url().await?.as_str().contains(&viewer));

        // The online devices, and today's energy from the fleet endpoint.
        assert_eq!(cell(c, a, "state").await, "online");
        assert_eq!(cell(c, "dev-0008", "state").await, "offline");
        wait_js(
            c,
            &format!(
                "var t = document.querySelector('#fleet-rows tr[data-device=\"{a}\"] td.energy').textContent;\
                 return / kWh$/.test(t) && parseFloat(t) > 0"
            ),
            "today's energy of the online device",
        )
        .await;
        assert_eq!(cell(c, "dev-0008", "energy").await, "0.00 kWh");
        wait_for_text(c, "#fleet-count", "2 online").await;

        // Sorting: by id descending, then online first.
        assert_eq!(shown(c, 2).await, ["dev-0000", "dev-0001"]);
        c.find(Locator::Css("th[data-sort=device_id]")).await?.click().await?;
        assert_eq!(shown(c, 2).await, ["dev-0999", "dev-0998"]);
        c.find(Locator::Css("th[data-sort=state]")).await?.click().await?;
        assert_eq!(shown(c, 3).await, [a, b, "dev-0000"]);
        // Filter: by id, by state word, and back.
        filter(c, "dev-00").await?;
        wait_js(c, "return document.querySelectorAll('#fleet-rows tr').length === 100", "100 rows").await;
        filter(c, "online").await?;
        wait_js(c, "return document.querySelectorAll('#fleet-rows tr').length === 2", "2 rows").await;
        filter(c, "").await?;
        wait_js(
            c,
            &format!("return document.querySelectorAll('#fleet-rows tr').length === {DEVICES}"),
            "all rows again",
        )
        .await;

        // An update reaches its row at the next refresh: a backlog.
        send_text(
            &mut dev_b,
            format!(
                r#"{{"type":"status","outbox_depth":5400,"oldest_ts_ms":{},"dropped":0,"unwritten":0,"dropped_disk_full":0,"dropped_damaged":0}}"#,
                now_ms() - 3 * 3_600_000 - 60_000
            ),
        )
        .await;
        wait_js(
            c,
            &format!(
                "return document.querySelector('#fleet-rows tr[data-device=\"{b}\"] td.backlog')\
                 .textContent.indexOf('3 h behind') === 0"
            ),
            "the backlog",
        )
        .await;
        assert!(cell(c, b, "backlog").await.contains("5400 queued"));
        let update = page_str(
            c,
            "var t = document.getElementById('fleet-table').dataset; \
             return (t.maxUpdateMs || '') + ' ms over ' + t.renders + ' renders (each: ' + t.updates + ')'",
        )
        .await;
        println!("fleet page: slowest refresh of {DEVICES} rows: {update}");

        // Screenshot (the online devices on top).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = c.screenshot().await?;
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = target_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ems-dashboard-fleet.png"), &png).unwrap();
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard-fleet.png");
        let refresh = std::env::var("EMS_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
        if docs.parent().is_some_and(|p| p.is_dir()) && (refresh || !docs.exists()) {
            let _ = std::fs::write(&docs, &png);
        }

        // A click opens the device's live view.
        c.find(Locator::Css(&format!("#fleet-rows tr[data-device=\"{a}\"]")))
            .await?
            .click()
            .await?;
        wait_for_text(c, "#dev-name", a).await;
        wait_for_text(c, "#dev-state", "online").await;
        assert_eq!(
            page_str(c, "return document.getElementById('view-live').classList.contains('hidden') ? 'hidden' : 'shown'").await,
            "shown"
        );
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    let _ = browser.client.clone().close().await;
    result.unwrap();
}

/// The first run as far as a test goes: the demo script's own setup
/// (`EMS_DEMO_SETUP_ONLY=1`, with this build's `ems-hub`) provisions the
/// database and the token files; the hub serves that database, `demo-1`
/// connects with the demo's device token and sends a reading (standing in
/// for the script's `ems-edge`), and the page, given the token read from
/// the demo's viewer-token file, shows `demo-1` online in the fleet view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_setup_leads_to_the_fleet_page() {
    use std::os::unix::fs::PermissionsExt;
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("demo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let bin = Path::new(env!("CARGO_BIN_EXE_ems-hub")).parent().unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .env("EMS_DEMO_SETUP_ONLY", "1")
        .env("EMS_DEMO_BIN", bin)
        .env("EMS_DEMO_DIR", &state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = state.join("viewer-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    let viewer = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    let device = std::fs::read_to_string(state.join("device-token"))
        .unwrap()
        .trim()
        .to_owned();
    // The script prints neither token.
    for t in [&viewer, &device] {
        assert!(!String::from_utf8_lossy(&out.stderr).contains(t.as_str()));
        assert!(!String::from_utf8_lossy(&out.stdout).contains(t.as_str()));
    }
    let db = format!("sqlite:{}", state.join("hub.db").display());
    let hub = TestHub::start_on(&db, |_| {}).await;
    let mut demo = hub.device("demo-1", &device).await;
    send_text(&mut demo, crate::harness::reading(1, 0)).await;
    wait_ack(&mut demo, 1, 0).await;

    let Some(browser) = Browser::launch(&chromium, &chromedriver, None, None).await else {
        return;
    };
    let c = &browser.client;
    let result = async {
        c.goto(&format!("http://{}/#fleet", hub.addr)).await?;
        log_in(c, &viewer).await?;
        wait_js(
            c,
            "var r = document.querySelector('#fleet-rows tr[data-device=\"demo-1\"] td.state');\
             return !!r && r.textContent === 'online'",
            "demo-1 online in the fleet view",
        )
        .await;
        wait_for_text(c, "#fleet-count", "1 devices · 1 online").await;
        // The help links to the dashboard's documentation, which the hub
        // serves.
        let href = page_str(
            c,
            "return document.querySelector('#token-help a').getAttribute('href')",
        )
        .await;
        let doc = http(hub.addr, "GET", &href, &[], None).await;
        assert_eq!(doc.status, 200, "{href}");
        assert!(doc.body.contains("## Getting a token"), "{href}");
        // The admin view's empty form says how to get an admin token.
        c.find(Locator::Css("#tab-admin")).await?.click().await?;
        let help = c.find(Locator::Css("#admin-help")).await?.text().await?;
        assert!(help.contains("ems-hub admin add NAME"), "{help}");
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    let _ = browser.client.clone().close().await;
    result.unwrap();
}
