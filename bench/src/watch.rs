//! `ems-bench watch`: one dashboard subscriber that records, for every live
//! reading of one device, when it arrived here with microsecond resolution.
//!
//! It writes one CSV line per reading frame — `epoch,seq,ts_ms,rx_ms,arrival_us`
//! (`arrival_us` is the wall clock, Unix microseconds, read as soon as the
//! frame is decoded) — so a scenario script can join it with other
//! timestamps of the same `(epoch, seq)` (the edge's sample instant, a
//! packet capture, the hub's database). The viewer token comes from the
//! `EMS_VIEWER_TOKEN` environment variable and travels only in the
//! `Authorization` header. Loopback targets only; the run stops by itself
//! after `--duration` or on SIGTERM.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::loopback_target;

/// Arguments of `ems-bench watch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hub URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    target: String,
    /// Device to follow (`/ws/dashboard/{device}`).
    #[arg(long)]
    device: String,
    /// Seconds to watch (at most 3600).
    #[arg(long)]
    duration: f64,
    /// CSV file to write (`epoch,seq,ts_ms,rx_ms,arrival_us`).
    #[arg(long)]
    out: PathBuf,
}

/// Unix microseconds now.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The integer after `"key":` in a JSON text, if any.
fn find_int(text: &str, key: &str) -> Option<i64> {
    let pat = format!("\"{key}\":");
    let start = text.find(&pat)? + pat.len();
    let rest = text[start..].trim_start();
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(a.duration > 0.0 && a.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    let token = std::env::var("EMS_VIEWER_TOKEN").context(
        "set EMS_VIEWER_TOKEN to a viewer token (it is sent only in the Authorization header)",
    )?;
    // One connection: a current-thread runtime wakes straight into the read.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(watch(a, token))
}

async fn watch(a: Args, token: String) -> anyhow::Result<()> {
    loopback_target(&a.target).await?;
    let url = format!(
        "{}/ws/dashboard/{}",
        a.target.trim_end_matches('/'),
        a.device
    );
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).context("viewer token")?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
        .await
        .with_context(|| format!("dashboard handshake with {url}"))?;
    let file = std::fs::File::create(&a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let mut out = BufWriter::new(file);
    writeln!(out, "epoch,seq,ts_ms,rx_ms,arrival_us")?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    // SIGTERM ends the watch early, with the file complete.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let (mut readings, mut other) = (0u64, 0u64);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let at = now_us();
                    let t = t.as_str();
                    if t.starts_with("{\"type\":\"reading\"") {
                        let f = |k| find_int(t, k).map_or(String::new(), |v| v.to_string());
                        writeln!(out, "{},{},{},{},{at}", f("epoch"), f("seq"), f("ts_ms"), f("rx_ms"))?;
                        readings += 1;
                    } else {
                        other += 1;
                    }
                }
                Some(Ok(Message::Close(c))) => bail!("hub closed the dashboard: {c:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("dashboard: {e}"),
                None => bail!("dashboard: connection ended"),
            },
            _ = sleep_until(deadline) => break,
            _ = term.recv() => break,
        }
    }
    out.flush()?;
    println!(
        "watch: device={} readings={readings} other_frames={other} -> {}",
        a.device,
        a.out.display()
    );
    let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::find_int;

    #[test]
    fn integers_are_found_by_key() {
        let t = r#"{"type":"reading","epoch":12,"seq":345,"ts_ms":-7,"meter":"main","device_id":"d","rx_ms":1764000000123}"#;
        assert_eq!(find_int(t, "epoch"), Some(12));
        assert_eq!(find_int(t, "seq"), Some(345));
        assert_eq!(find_int(t, "ts_ms"), Some(-7));
        assert_eq!(find_int(t, "rx_ms"), Some(1_764_000_000_123));
        assert_eq!(find_int(t, "power_w"), None);
    }
}
