//! The energy endpoint, the CSV export and plausibility flags through the
//! running hub: readings go in over the device socket (the writer computes
//! flags and keeps the slots), answers come out over HTTP and are compared
//! with the brute-force rule over the raw rows of the database file.

use std::time::Duration;

use ems_hub::energy::buckets::{buckets, Bucket, Zone};
use ems_hub::energy::rule::{rollup_brute, BucketResult, Limits, MeterReading, ReadingKey};
use ems_hub::store::Row;

use crate::dashboard::{bearer, http, HttpResp};
use crate::harness::*;

const MIN: i64 = 60_000;
const H: i64 = 60 * MIN;

fn at(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

async fn get(hub: &TestHub, token: &str, path: &str) -> HttpResp {
    http(
        hub.addr,
        "GET",
        path,
        &[("Authorization", &bearer(token))],
        None,
    )
    .await
}

/// The raw rows of a meter, straight from the database file.
fn raw_rows(hub: &TestHub, device: &str, meter: &str) -> Vec<MeterReading> {
    let c = rusqlite::Connection::open(&hub.db_path).unwrap();
    let mut stmt = c
        .prepare(
            "SELECT ts, epoch, seq, energy_wh, power_w FROM readings \
             WHERE device_id = ?1 AND meter = ?2 ORDER BY ts, epoch, seq",
        )
        .unwrap();
    let rows = stmt
        .query_map([device, meter], |r| {
            Ok(MeterReading {
                key: ReadingKey {
                    ts_ms: r.get(0)?,
                    epoch: r.get::<_, i64>(1)? as u64,
                    seq: r.get::<_, i64>(2)? as u64,
                },
                energy_wh: r.get(3)?,
                power_w: r.get(4)?,
            })
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// A JSON bucket of the answer against the rule's bucket.
fn assert_bucket(got: &serde_json::Value, want: &BucketResult, ctx: &str) {
    assert_eq!(got["start_ms"], want.start_ms, "{ctx}");
    assert_eq!(got["end_ms"], want.end_ms, "{ctx}");
    assert_eq!(got["samples"], want.samples, "{ctx}");
    assert_eq!(got["resets"], want.resets, "{ctx}");
    assert_eq!(got["flagged"], want.flagged, "{ctx}");
    assert_eq!(got["coverage"].as_f64().unwrap(), want.coverage, "{ctx}");
    let e = got["energy_wh"].as_f64().unwrap();
    assert!(
        (e - want.energy_wh).abs() < 1e-6,
        "{ctx}: {e} vs {}",
        want.energy_wh
    );
    match want.power_w {
        None => assert!(got["power_w"].is_null(), "{ctx}"),
        Some(p) => {
            assert_eq!(got["power_w"]["min"].as_f64().unwrap(), p.min, "{ctx}");
            assert_eq!(got["power_w"]["max"].as_f64().unwrap(), p.max, "{ctx}");
            let avg = got["power_w"]["avg"].as_f64().unwrap();
            assert!((avg - p.avg).abs() < 1e-6, "{ctx}");
        }
    }
}

/// Sends `n` readings of a constant 1 kW every `step` from `t0`.
async fn send_kw(ws: &mut Client, seq0: u64, t0: i64, step: i64, n: i64) -> u64 {
    let mut seq = seq0;
    for i in 0..n {
        let ts = t0 + i * step;
        send_text(
            ws,
            format!(
                r#"{{"type":"reading","epoch":1,"seq":{seq},"ts_ms":{ts},"meter":"main","power_w":1000.0,"energy_wh":{}}}"#,
                ts as f64 / H as f64 * 1000.0
            ),
        )
        .await;
        seq += 1;
    }
    seq - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_endpoint_local_days_across_dst_and_odd_offsets() {
    let hub = TestHub::start_with(|c| {
        c.timezone = Zone::parse("Europe/Berlin").unwrap();
    })
    .await;
    let token = hub.add_device("m1");
    let viewer = hub.add_viewer("v", &["m1"]);
    let mut dev = hub.device("m1", &token).await;
    // Four days of 1 kW around each Berlin change, a reading every 5 min,
    // plus a counter reset and a glitch on the last day of the second run.
    let last = send_kw(&mut dev, 0, at("2026-03-27T12:00:00Z"), 5 * MIN, 4 * 288).await;
    let last = send_kw(
        &mut dev,
        last + 1,
        at("2026-10-23T12:00:00Z"),
        5 * MIN,
        4 * 288,
    )
    .await;
    let t = at("2026-10-27T12:00:00Z");
    for (i, wh) in [(0, 10.0), (1, 1e12), (2, 1e12 + 5.0)] {
        send_text(
            &mut dev,
            format!(
                r#"{{"type":"reading","epoch":1,"seq":{},"ts_ms":{},"meter":"main","energy_wh":{wh}}}"#,
                last + 1 + i,
                t + i as i64 * 1000
            ),
        )
        .await;
    }
    wait_ack(&mut dev, 1, last + 3).await;

    let q = |from: &str, to: &str, rest: &str| {
        format!(
            "/api/devices/m1/energy?from_ms={}&to_ms={}&{rest}",
            at(from),
            at(to)
        )
    };
    // No tz: the hub's --timezone; the range snaps outward to whole days.
    let r = get(
        &hub,
        &viewer,
        &q("2026-03-29T10:00:00Z", "2026-03-29T11:00:00Z", "bucket=day"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(
        (
            v["device_id"].as_str(),
            v["tz"].as_str(),
            v["bucket"].as_str()
        ),
        (Some("m1"), Some("Europe/Berlin"), Some("day"))
    );
    let day = &v["meters"][0]["buckets"][0];
    assert_eq!(v["meters"][0]["meter"], "main");
    assert_eq!(day["start_ms"], at("2026-03-28T23:00:00Z"));
    assert_eq!(day["end_ms"], at("2026-03-29T22:00:00Z"), "23 hours");
    assert!(
        (day["energy_wh"].as_f64().unwrap() - 23_000.0).abs() < 1e-6,
        "{day}"
    );
    assert_eq!(
        (day["samples"].as_u64(), day["coverage"].as_f64()),
        (Some(23 * 12), Some(1.0))
    );
    let r = get(
        &hub,
        &viewer,
        &q(
            "2026-10-25T12:00:00Z",
            "2026-10-25T12:00:00.001Z",
            "bucket=day&tz=Europe%2FBerlin",
        ),
    )
    .await;
    let day = &r.json()["meters"][0]["buckets"][0];
    assert_eq!(
        day["end_ms"].as_i64().unwrap() - day["start_ms"].as_i64().unwrap(),
        25 * H
    );
    assert!(
        (day["energy_wh"].as_f64().unwrap() - 25_000.0).abs() < 1e-6,
        "{day}"
    );
    // Half- and quarter-hour zones: days start at 18:30Z and 18:15Z.
    for (tz, start) in [
        ("Asia/Kolkata", "2026-03-28T18:30:00Z"),
        ("Asia/Kathmandu", "2026-03-28T18:15:00Z"),
    ] {
        let r = get(
            &hub,
            &viewer,
            &q(
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:00:00Z",
                &format!("bucket=day&tz={tz}"),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["tz"], tz);
        let day = &v["meters"][0]["buckets"][0];
        assert_eq!(day["start_ms"], at(start), "{tz}");
        assert!(
            (day["energy_wh"].as_f64().unwrap() - 24_000.0).abs() < 1e-6,
            "{tz}: {day}"
        );
    }

    // Every answer equals the rule over the raw rows.
    let raw = raw_rows(&hub, "m1", "main");
    assert_eq!(raw.len(), 2 * 4 * 288 + 3);
    let (from, to) = (at("2026-03-26T00:00:00Z"), at("2026-11-01T00:00:00Z"));
    for tz in ["Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "UTC"] {
        for bucket in ["hour", "day", "month"] {
            let z = Zone::parse(tz).unwrap();
            let spans = buckets(&z, Bucket::parse(bucket).unwrap(), from, to).unwrap();
            let want = rollup_brute(&raw, &spans, &Limits::default());
            let r = get(
                &hub,
                &viewer,
                &format!(
                    "/api/devices/m1/energy?from_ms={from}&to_ms={to}&bucket={bucket}&tz={tz}"
                ),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let got = r.json()["meters"][0]["buckets"].as_array().unwrap().clone();
            assert_eq!(got.len(), want.len(), "{tz} {bucket}");
            for (g, w) in got.iter().zip(&want) {
                assert_bucket(g, w, &format!("{tz} {bucket}"));
            }
            // Empty buckets are there; the reset and the glitch are counted.
            assert!(got.iter().any(|b| b["samples"] == 0));
            let resets: u64 = got.iter().map(|b| b["resets"].as_u64().unwrap()).sum();
            let flagged: u64 = got.iter().map(|b| b["flagged"].as_u64().unwrap()).sum();
            assert_eq!((resets, flagged), (1, 1), "{tz} {bucket}");
        }
    }
    // The writer flagged the reset and the glitch; /metrics counts them.
    let m = http(hub.addr, "GET", "/metrics", &[], None).await;
    assert!(
        m.body
            .contains("ems_reading_flags_total{flag=\"counter_reset\"} 1"),
        "{}",
        m.body
    );
    assert!(m
        .body
        .contains("ems_reading_flags_total{flag=\"energy_glitch\"} 1"));
    let r = get(
        &hub,
        &viewer,
        &format!("/api/devices/m1/readings?from_ms={t}&to_ms={}", t + 10_000),
    )
    .await;
    let flags: Vec<u64> = r.json()["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["flags"].as_u64().unwrap())
        .collect();
    assert_eq!(flags, vec![8, 4, 0], "reset, glitch, plausible again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_endpoint_refuses_like_the_readings_api() {
    let hub = TestHub::start().await;
    hub.add_device("m1");
    hub.add_device("m2");
    let viewer = hub.add_viewer("v", &["m1"]);
    let admin = hub.admin().add_admin("ops").unwrap();
    let ok = "/api/devices/m1/energy?from_ms=0&to_ms=1&bucket=day";
    assert_eq!(http(hub.addr, "GET", ok, &[], None).await.status, 401);
    assert_eq!(get(&hub, &viewer, ok).await.status, 200);
    assert_eq!(
        get(
            &hub,
            &viewer,
            "/api/devices/m2/energy?from_ms=0&to_ms=1&bucket=day"
        )
        .await
        .status,
        403
    );
    assert_eq!(get(&hub, &admin, ok).await.status, 403);
    let foreign = http(
        hub.addr,
        "GET",
        ok,
        &[
            ("Authorization", &bearer(&viewer)),
            ("Origin", "https://evil.example"),
        ],
        None,
    )
    .await;
    assert_eq!(foreign.status, 403);
    assert_eq!(
        http(
            hub.addr,
            "POST",
            ok,
            &[("Authorization", &bearer(&viewer))],
            Some("{}")
        )
        .await
        .status,
        405
    );
    for (query, param) in [
        ("from_ms=0&to_ms=1&bucket=week", "bucket"),
        ("from_ms=0&to_ms=1&bucket=day&tz=Mars%2FOlympus", "tz"),
        ("from_ms=0&to_ms=1&bucket=day&tz=%2B05%3A30", "tz"),
        ("from_ms=a&to_ms=1&bucket=day", "from_ms"),
        ("to_ms=1&bucket=day", "from_ms"),
        ("from_ms=5&to_ms=1&bucket=day", "from_ms"),
        ("from_ms=0&to_ms=1", "bucket"),
        ("from_ms=0&to_ms=999999999999999&bucket=hour", "to_ms"),
    ] {
        let r = get(&hub, &viewer, &format!("/api/devices/m1/energy?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with(&format!("{param}: ")), "{query}: {e}");
    }
    // A credential-looking parameter is refused before anything else.
    let r = get(
        &hub,
        &viewer,
        "/api/devices/m1/energy?from_ms=0&to_ms=1&bucket=day&token=x",
    )
    .await;
    assert_eq!(r.status, 400);
    // A device without readings: every bucket present and empty, no meters.
    let v = get(
        &hub,
        &viewer,
        "/api/devices/m1/energy?from_ms=0&to_ms=86400000&bucket=hour&tz=UTC",
    )
    .await
    .json();
    assert_eq!(v["meters"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_streams_every_reading_with_flags() {
    let hub = TestHub::start().await;
    let token = hub.add_device("c1");
    hub.add_device("c2");
    let viewer = hub.add_viewer("v", &["c1"]);
    // Three pages' worth straight into the store, then two over the socket
    // (one out of the frequency range).
    let t0 = at("2026-11-01T00:00:00Z");
    let n = 20_000i64;
    let rows: Vec<Row> = (0..n)
        .map(|i| Row {
            device_id: "c1".into(),
            received_at_ms: t0 + i * 1000,
            reading: ems_shared::Reading {
                epoch: 7,
                seq: i as u64,
                ts_ms: t0 + i * 1000,
                meter: if i % 2 == 0 {
                    "main".into()
                } else {
                    "pv,1".into()
                },
                power_w: Some(i as f64),
                energy_wh: Some(i as f64 * 0.25),
                ..Default::default()
            },
        })
        .collect();
    let mut s = ems_hub::store::open(&hub.db_url).unwrap();
    for chunk in rows.chunks(5000) {
        s.insert_batch(chunk).unwrap();
    }
    drop(s);
    let mut dev = hub.device("c1", &token).await;
    let t1 = t0 + n * 1000;
    send_text(&mut dev, format!(r#"{{"type":"reading","epoch":8,"seq":0,"ts_ms":{t1},"meter":"main","voltage_v":230.5,"frequency_hz":70.0}}"#)).await;
    send_text(
        &mut dev,
        format!(
            r#"{{"type":"reading","epoch":8,"seq":1,"ts_ms":{},"meter":"main","power_w":-1.5}}"#,
            t1 + 1
        ),
    )
    .await;
    wait_ack(&mut dev, 8, 1).await;

    let r = get(&hub, &viewer, "/api/devices/c1/readings.csv").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/csv; charset=utf-8")
    );
    assert_eq!(
        r.header("transfer-encoding").as_deref(),
        Some("chunked"),
        "streamed"
    );
    assert!(r.header("content-disposition").unwrap().contains("c1.csv"));
    let csv = r.body;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "device_id,meter,ts_ms,ts,epoch,seq,voltage_v,current_a,power_w,energy_wh,frequency_hz,power_factor,reactive_power_var,flags"
    );
    assert_eq!(lines.len(), 1 + n as usize + 2);
    assert_eq!(
        lines[1],
        format!("c1,main,{t0},2026-11-01T00:00:00.000Z,7,0,,,0,0,,,,0")
    );
    assert_eq!(
        lines[2],
        format!(
            "c1,\"pv,1\",{},2026-11-01T00:00:01.000Z,7,1,,,1,0.25,,,,0",
            t0 + 1000
        )
    );
    assert_eq!(
        lines[n as usize + 1],
        format!("c1,main,{t1},2026-11-01T05:33:20.000Z,8,0,230.5,,,,70,,,2")
    );
    assert!(lines[n as usize + 2].ends_with(",8,1,,,-1.5,,,,,0"));
    // In (ts, epoch, seq) order, each reading once.
    let keys: Vec<(i64, u64, u64)> = lines[1..]
        .iter()
        .map(|l| {
            let rest = l.strip_prefix("c1,").unwrap();
            let rest = match rest.strip_prefix("\"pv,1\",") {
                Some(r) => r,
                None => rest.split_once(',').unwrap().1,
            };
            let f: Vec<&str> = rest.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    // A range; empty ranges are a header only.
    let r = get(
        &hub,
        &viewer,
        &format!(
            "/api/devices/c1/readings.csv?from_ms={}&to_ms={}",
            t0 + 1000,
            t0 + 4000
        ),
    )
    .await;
    assert_eq!(r.body.lines().count(), 1 + 3);
    let r = get(
        &hub,
        &viewer,
        "/api/devices/c1/readings.csv?from_ms=0&to_ms=5",
    )
    .await;
    assert_eq!(r.body.lines().count(), 1);
    // Same refusals as the rest of the viewer API, as JSON.
    assert_eq!(
        http(hub.addr, "GET", "/api/devices/c1/readings.csv", &[], None)
            .await
            .status,
        401
    );
    assert_eq!(
        get(&hub, &viewer, "/api/devices/c2/readings.csv")
            .await
            .status,
        403
    );
    let r = get(&hub, &viewer, "/api/devices/c1/readings.csv?from_ms=x").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().starts_with("from_ms: "));
    let foreign = http(
        hub.addr,
        "GET",
        "/api/devices/c1/readings.csv",
        &[
            ("Authorization", &bearer(&viewer)),
            ("Origin", "https://evil.example"),
        ],
        None,
    )
    .await;
    assert_eq!(foreign.status, 403);
    assert_eq!(
        http(
            hub.addr,
            "POST",
            "/api/devices/c1/readings.csv",
            &[("Authorization", &bearer(&viewer))],
            Some("{}")
        )
        .await
        .status,
        405
    );
    assert_eq!(
        get(&hub, &viewer, "/api/devices/c1/readings.csv?token=abc")
            .await
            .status,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_of_a_client_that_goes_away_stops() {
    // A client that reads the head and hangs up: the hub must not keep
    // producing (nothing to observe but that the hub stays healthy and
    // answers the next request at once).
    let hub = TestHub::start().await;
    hub.add_device("c1");
    let viewer = hub.add_viewer("v", &["c1"]);
    let t0 = at("2026-11-01T00:00:00Z");
    let rows: Vec<Row> = (0..30_000i64)
        .map(|i| Row {
            device_id: "c1".into(),
            received_at_ms: t0,
            reading: ems_shared::Reading {
                epoch: 1,
                seq: i as u64,
                ts_ms: t0 + i,
                meter: "main".into(),
                power_w: Some(1.0),
                ..Default::default()
            },
        })
        .collect();
    ems_hub::store::open(&hub.db_url)
        .unwrap()
        .insert_batch(&rows)
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let req = format!(
            "GET /api/devices/c1/readings.csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {viewer}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(SOON, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(
        &hub,
        &viewer,
        "/api/devices/c1/readings.csv?from_ms=0&to_ms=1",
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Opens `GET path` on a socket with a small receive buffer and reads the
/// status line and the first bytes of the body; the rest waits in the hub
/// until the caller reads on.
async fn open_slow(hub: &TestHub, token: &str, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(hub.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("device_id,meter,") {
        let n = tokio::time::timeout(SOON, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_holds_the_viewers_heavy_turn_while_it_streams() {
    let hub = TestHub::start().await;
    hub.add_device("c1");
    let viewer = hub.add_viewer("v", &["c1"]);
    let other = hub.add_viewer("w", &["c1"]);
    // About 10 MB of CSV: more than the socket buffers and the export's
    // channel hold, so the download cannot end while the client reads
    // nothing.
    let t0 = at("2026-11-01T00:00:00Z");
    let n = 100_000i64;
    let rows: Vec<Row> = (0..n)
        .map(|i| Row {
            device_id: "c1".into(),
            received_at_ms: t0,
            reading: ems_shared::Reading {
                epoch: 1,
                seq: i as u64,
                ts_ms: t0 + i * 1000,
                meter: "main".into(),
                power_w: Some(1000.0),
                energy_wh: Some(i as f64 / 3.6),
                ..Default::default()
            },
        })
        .collect();
    let mut store = ems_hub::store::open(&hub.db_url).unwrap();
    for chunk in rows.chunks(10_000) {
        store.insert_batch(chunk).unwrap();
    }
    drop(store);
    let csv = "/api/devices/c1/readings.csv";
    let energy = format!(
        "/api/devices/c1/energy?from_ms={t0}&to_ms={}&bucket=day&tz=UTC",
        t0 + n * 1000
    );

    let mut s = open_slow(&hub, &viewer, csv).await;
    // While it streams: the token's other heavy queries are refused at
    // once (not queued behind a download), another token's are not.
    for path in [energy.as_str(), "/api/devices/c1/readings?limit=5"] {
        let r = get(&hub, &viewer, path).await;
        assert_eq!(r.status, 429, "{path} while the export streams");
        assert!(r.header("retry-after").is_some(), "{path}: {}", r.head);
    }
    assert_eq!(get(&hub, &other, &energy).await.status, 200);
    // The download is whole, and once it ended the token may query again.
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.ends_with(b"0\r\n\r\n"), "the chunked body was ended");
    assert!(
        rest.iter().filter(|b| **b == b'\n').count() as i64 > n - 100,
        "the rows arrived"
    );
    assert_eq!(get(&hub, &viewer, &energy).await.status, 200);

    // A client that goes away mid-stream gives the turn back.
    let s = open_slow(&hub, &viewer, csv).await;
    assert_eq!(get(&hub, &viewer, &energy).await.status, 429);
    drop(s);
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let status = get(&hub, &viewer, &energy).await.status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the turn came back after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_command_writes_what_the_endpoint_streams() {
    let hub = TestHub::start().await;
    hub.add_device("x1");
    let viewer = hub.add_viewer("v", &["x1"]);
    let t0 = at("2026-11-01T00:00:00Z");
    let rows: Vec<Row> = (0..10_000i64)
        .map(|i| Row {
            device_id: "x1".into(),
            received_at_ms: t0,
            reading: ems_shared::Reading {
                epoch: 1,
                seq: i as u64,
                ts_ms: t0 + i * 1000,
                meter: "main".into(),
                power_w: Some(i as f64 / 4.0),
                frequency_hz: Some(if i == 5 { 80.0 } else { 50.0 }),
                energy_wh: Some(i as f64),
                ..Default::default()
            },
        })
        .collect();
    ems_hub::store::open(&hub.db_url)
        .unwrap()
        .insert_batch(&rows)
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
            .arg("export")
            .args(args)
            .args(["--database", &hub.db_url])
            .env_remove("EMS_LOG_LEVEL")
            .output()
            .unwrap()
    };
    let csv = run(&["--device", "x1"]);
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let http_csv = get(&hub, &viewer, "/api/devices/x1/readings.csv")
        .await
        .body;
    assert_eq!(String::from_utf8(csv.stdout).unwrap(), http_csv);
    assert!(
        http_csv.lines().nth(6).unwrap().ends_with(",2"),
        "the frequency flag"
    );

    // RFC 3339 and epoch ms bounds; JSON Lines.
    let from = "2026-11-01T00:00:10Z";
    let to = (t0 + 13_000).to_string();
    let out = run(&[
        "--device", "x1", "--from", from, "--to", &to, "--format", "jsonl",
    ]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["ts_ms"], t0 + 10_000);
    assert_eq!(lines[0]["ts"], "2026-11-01T00:00:10.000Z");
    assert_eq!(lines[0]["flags"], 0);
    assert_eq!(lines[0]["device_id"], "x1");

    // Bad arguments: one line on stderr, exit code 1 or 2.
    let bad = run(&["--device", "x1", "--from", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = run(&["--device", "no/slash"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--device"));

    // A reader that stops early (`| head -1`) ends the export quietly.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["export", "--device", "x1", "--database", &hub.db_url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    use std::io::Read;
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
