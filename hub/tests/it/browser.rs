//! The dashboard page end to end in a real headless Chromium, driven over
//! WebDriver (chromedriver + fantoccini): a viewer pastes a token, picks
//! up the device list, and a reading a test device sends shows up on the
//! page; and the energy charts in the browser's time zone with their CSV
//! download. Screenshots are kept at `target/ems-dashboard*.png` (and copied to
//! `docs/dashboard.png` and `docs/dashboard-energy.png` when missing or
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
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

pub(crate) async fn wait_for_text(c: &fantoccini::Client, css: &str, want: &str) -> String {
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
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
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

    let Some(browser) = Browser::launch(&chromium, &chromedriver, None, None).await else {
        return;
    };
    let client = &browser.client;
    let admin = hub.admin().add_admin("ops").unwrap();
    let result = drive(client, &hub, &mut dev, &viewer, &admin).await;
    let _ = browser.client.clone().close().await;
    result.unwrap();
}

/// A WebDriver session in headless Chromium (and the chromedriver that
/// drives it, killed on drop).
pub(crate) struct Browser {
    pub(crate) client: fantoccini::Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

/// Waits until the day in `zone` is at least `after` old and at least
/// `before` from its end: the test and the page it loads then agree on
/// which day is "today".
pub(crate) async fn away_from_midnight(
    zone: &jiff::tz::TimeZone,
    before: Duration,
    after: Duration,
) {
    let now = jiff::Timestamp::from_millisecond(now_ms())
        .unwrap()
        .to_zoned(zone.clone());
    let ms = |z: &jiff::Zoned| z.timestamp().as_millisecond();
    let since_midnight = ms(&now) - ms(&now.start_of_day().unwrap());
    let to_midnight = ms(&now.tomorrow().unwrap().start_of_day().unwrap()) - ms(&now);
    let (before, after) = (before.as_millis() as i64, after.as_millis() as i64);
    let wait = if since_midnight < after {
        after - since_midnight
    } else if to_midnight < before {
        to_midnight + after
    } else {
        0
    };
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
}

/// The browser and driver binaries, or `None` after a SKIP (or a panic
/// under `EMS_REQUIRE_BROWSER=1`).
pub(crate) fn browser_binaries() -> Option<(PathBuf, PathBuf)> {
    let Some(chromium) = find(&[
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]) else {
        skip("chromium is not installed");
        return None;
    };
    let Some(chromedriver) = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
    else {
        skip("chromedriver (chromium-driver) is not installed");
        return None;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    Some((chromium, chromedriver))
}

impl Browser {
    /// Starts chromedriver and a session; `tz` sets the browser's time
    /// zone (the `TZ` the browser inherits), `downloads` where downloaded
    /// files go.
    pub(crate) async fn launch(
        chromium: &Path,
        chromedriver: &Path,
        tz: Option<&str>,
        downloads: Option<&Path>,
    ) -> Option<Browser> {
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(tz) = tz {
            cmd.env("TZ", tz);
        }
        let _driver = match cmd.spawn() {
            Ok(c) => Driver(c),
            Err(e) => {
                skip(&format!("chromedriver does not start: {e}"));
                return None;
            }
        };
        let mut options = serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        });
        if let Some(dir) = downloads {
            options["prefs"] = serde_json::json!({
                "download.default_directory": dir,
                "download.prompt_for_download": false,
            });
        }
        let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
            serde_json::json!({ "browserName": "chrome", "goog:chromeOptions": options }),
        )
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
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot start a WebDriver session: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        };
        Some(Browser {
            client,
            _driver,
            _profile: profile,
        })
    }
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

/// Runs a script in the page and returns its string result.
pub(crate) async fn page_str(c: &fantoccini::Client, script: &str) -> String {
    let v = c.execute(script, vec![]).await.unwrap();
    v.as_str().unwrap_or_default().to_owned()
}

/// The energy charts in the browser's own time zone (Asia/Kathmandu,
/// +05:45, given to the browser as `TZ`): today by hour and the last 30
/// days by day start at local midnight, a day with a gap, a counter reset
/// and an implausible jump are marked, the totals are the hub's answer for
/// that zone, and "Download CSV" saves the readings of the range. Keeps a
/// screenshot of the energy card (`docs/dashboard-energy.png` when missing
/// or `EMS_UPDATE_SCREENSHOT=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_charts_in_the_browsers_time_zone() {
    const TZ: &str = "Asia/Kathmandu";
    const H: i64 = 3_600_000;
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
    let hub = TestHub::start().await;
    let token = hub.add_device("ems_001");
    let viewer = hub.add_viewer("wall", &["ems_001"]);

    // Local midnights in Kathmandu: today and n days back. The page works
    // out "today" when it renders: a run that would span the next local
    // midnight waits until it has passed.
    let zone = jiff::tz::TimeZone::get(TZ).unwrap();
    away_from_midnight(&zone, Duration::from_secs(180), Duration::from_secs(1)).await;
    let now = now_ms();
    let today = jiff::Timestamp::from_millisecond(now)
        .unwrap()
        .to_zoned(zone)
        .start_of_day()
        .unwrap();
    let day = |n: i64| {
        today
            .checked_sub(jiff::Span::new().days(n))
            .unwrap()
            .timestamp()
            .as_millisecond()
    };
    // 1 kW every 5 minutes from 5 days back until a minute ago, except:
    // 10:00–14:00 three days back (a gap), the counter restarting from 0
    // at noon two days back (a reset) and jumping by 10 MWh at 08:00
    // yesterday (implausible: flagged, not counted).
    let (gap, reset_at, jump_at) = (
        (day(3) + 10 * H, day(3) + 14 * H),
        day(2) + 12 * H,
        day(1) + 8 * H,
    );
    let mut dev = hub.device("ems_001", &token).await;
    let (mut seq, mut ts) = (0u64, day(5));
    while ts < now - 60_000 {
        if !(gap.0..gap.1).contains(&ts) {
            let mut wh = (ts - day(5)) as f64 / H as f64 * 1000.0;
            if ts >= reset_at {
                wh -= (reset_at - day(5)) as f64 / H as f64 * 1000.0;
            }
            if ts >= jump_at {
                wh += 10_000_000.0;
            }
            send_text(
                &mut dev,
                format!(
                    r#"{{"type":"reading","epoch":1,"seq":{seq},"ts_ms":{ts},"meter":"main","voltage_v":230.0,"current_a":4.35,"power_w":1000.0,"energy_wh":{wh:.3}}}"#
                ),
            )
            .await;
            seq += 1;
        }
        ts += 300_000;
    }
    let sent = seq;
    wait_ack(&mut dev, 1, sent - 1).await;

    // The hub's own answer for the page's 30 days in that zone.
    let q = format!(
        "/api/devices/ems_001/energy?from_ms={}&to_ms={}&bucket=day&tz=Asia%2FKathmandu",
        day(29),
        day(-1)
    );
    let r = crate::dashboard::http(
        hub.addr,
        "GET",
        &q,
        &[("Authorization", &crate::dashboard::bearer(&viewer))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let days = answer["meters"][0]["buckets"].as_array().unwrap().clone();
    assert_eq!(days.len(), 30);
    let total_wh: f64 = days.iter().map(|b| b["energy_wh"].as_f64().unwrap()).sum();
    let api_gaps = days
        .iter()
        .filter(|b| b["end_ms"].as_i64().unwrap() <= now && b["coverage"].as_f64().unwrap() < 0.999)
        .count();
    // 24 empty days, and the day with the four-hour gap.
    assert!(api_gaps >= 25, "{api_gaps}");
    assert!(days[26]["coverage"].as_f64().unwrap() < 0.9, "{}", days[26]);

    let downloads = tempfile::tempdir().unwrap();
    let Some(browser) =
        Browser::launch(&chromium, &chromedriver, Some(TZ), Some(downloads.path())).await
    else {
        return;
    };
    let c = &browser.client;
    let result = async {
        c.goto(&format!("http://{}/", hub.addr)).await?;
        let input = c.wait().for_element(Locator::Css("#token")).await?;
        input.send_keys(&viewer).await?;
        c.find(Locator::Css("#save-token")).await?.click().await?;
        // Chromium's ICU names the zone by its older spelling,
        // Asia/Katmandu, a link to the same zone in the IANA database.
        wait_for_text(c, "#energy-tz", "Asia/Kat").await;
        wait_for_text(c, "#energy-note", "1 counter reset").await;
        wait_for_text(c, "#energy-note", "1 implausible jump").await;
        let data = |id: &str, key: &str| {
            format!("return document.getElementById('{id}').dataset.{key} || ''")
        };
        // The buckets start at local midnights of the browser's zone.
        assert_eq!(page_str(c, &data("energy-hours", "bars")).await, "24");
        assert_eq!(
            page_str(c, &data("energy-hours", "first")).await,
            day(0).to_string()
        );
        assert_eq!(page_str(c, &data("energy-days", "bars")).await, "30");
        assert_eq!(
            page_str(c, &data("energy-days", "first")).await,
            day(29).to_string()
        );
        // Gaps, the reset and the jump are marked; the total is the hub's.
        assert_eq!(
            page_str(c, &data("energy-days", "gaps")).await,
            api_gaps.to_string()
        );
        assert_eq!(page_str(c, &data("energy-days", "empty")).await, "24");
        wait_for_text(c, "#energy-note", "24 days without readings").await;
        assert_eq!(page_str(c, &data("energy-days", "resets")).await, "1");
        assert_eq!(page_str(c, &data("energy-days", "flagged")).await, "1");
        assert_eq!(
            page_str(c, &data("energy-days", "kwh")).await,
            format!("{:.3}", total_wh / 1000.0)
        );
        wait_for_text(c, "#energy-month", &format!("{:.2} kWh", total_wh / 1000.0)).await;

        // Screenshot of the energy card (scrolled into the window first:
        // the element screenshot is clipped to the viewport).
        c.execute(
            "document.getElementById('energy').scrollIntoView()",
            vec![],
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = c.find(Locator::Css("#energy")).await?.screenshot().await?;
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = target_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ems-dashboard-energy.png"), &png).unwrap();
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard-energy.png");
        let refresh = std::env::var("EMS_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1");
        if docs.parent().is_some_and(|p| p.is_dir()) && (refresh || !docs.exists()) {
            let _ = std::fs::write(&docs, &png);
        }

        // The 30 days as CSV: every reading sent, the reset and the jump
        // flagged.
        c.find(Locator::Css("#csv-days")).await?.click().await?;
        wait_for_text(c, "#csv-status", "saved ems_001_").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let csv = loop {
            let done = std::fs::read_dir(downloads.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "csv"));
            if let Some(p) = done {
                break std::fs::read_to_string(p).unwrap();
            }
            assert!(Instant::now() < deadline, "no CSV file was downloaded");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("device_id,meter,ts_ms,ts,epoch,seq,voltage_v,current_a,power_w,energy_wh,frequency_hz,power_factor,reactive_power_var,flags")
        );
        let flags: Vec<u32> = lines
            .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(flags.len() as u64, sent);
        let with = |bit: u32| flags.iter().filter(|f| *f & bit != 0).count();
        assert_eq!(with(ems_hub::energy::flags::COUNTER_RESET), 1);
        assert_eq!(with(ems_hub::energy::flags::ENERGY_GLITCH), 1);
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    let _ = browser.client.clone().close().await;
    result.unwrap();
}
