//! `ems-hub watch`: a terminal dashboard. Subscribes to a device's live
//! feed with a viewer token (sent in the `Authorization` header) and prints
//! one line per reading — the `mosquitto_sub` of EMS.

use std::time::Duration;

use ems_shared::Measurement;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Why watching stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The hub URL is not `ws://host[:port]` or `wss://…`.
    #[error("bad hub URL {0:?}: expected ws://host[:port] or wss://host[:port]")]
    BadUrl(String),
    /// The hub refused the viewer token.
    #[error("the hub refused the subscription (HTTP {0}): check the viewer token and its scope")]
    Refused(u16),
    /// Network failure.
    #[error("connection to the hub failed: {0}")]
    Network(String),
}

/// How `watch` prints one measurement: its unit from the measurement list,
/// scaled for reading at a glance.
struct Display {
    /// Printed after the number.
    unit: &'static str,
    /// The value is multiplied by this.
    scale: f64,
    /// Digits after the decimal point.
    decimals: usize,
}

/// The display of `m`: the list's unit with two decimals, except where a
/// terminal reads better otherwise (energy in kWh).
fn display(m: Measurement) -> Display {
    let plain = |decimals| Display {
        unit: m.unit(),
        scale: 1.0,
        decimals,
    };
    match m {
        Measurement::VoltageV | Measurement::PowerW | Measurement::ReactivePowerVar => plain(1),
        Measurement::EnergyWh => Display {
            unit: "kWh",
            scale: 1e-3,
            decimals: 3,
        },
        // The list's unit is "" (dimensionless).
        Measurement::PowerFactor => Display {
            unit: "PF",
            ..plain(2)
        },
        _ => plain(2),
    }
}

/// Formats one dashboard frame as a line of text; `None` for frames that
/// are not readings.
pub fn format_line(frame: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(frame).ok()?;
    if v["type"] != "reading" {
        return Some(format!("{} {}", v["type"].as_str().unwrap_or("?"), frame));
    }
    let mut line = format!(
        "{} {} seq={}",
        v["device_id"].as_str().unwrap_or("?"),
        v["meter"].as_str().unwrap_or("?"),
        v["seq"]
    );
    for m in Measurement::ALL {
        if let Some(x) = v[m.name()].as_f64() {
            let d = display(m);
            line.push_str(&format!("  {:.*} {}", d.decimals, x * d.scale, d.unit));
        }
    }
    if let (Some(ts), Some(rx)) = (v["ts_ms"].as_i64(), v["rx_ms"].as_i64()) {
        line.push_str(&format!("  (age {} ms)", rx - ts));
    }
    Some(line)
}

/// Subscribes to `device_id` on `hub_url` and prints every frame until the
/// connection ends. Reconnects after a drop, forever.
pub async fn watch(hub_url: &str, device_id: &str, token: &str) -> Result<(), WatchError> {
    let base = hub_url.trim_end_matches('/');
    if !(base.starts_with("ws://") || base.starts_with("wss://")) || base.contains('?') {
        return Err(WatchError::BadUrl(hub_url.to_string()));
    }
    let url = format!("{base}/ws/dashboard/{device_id}");
    let auth =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| WatchError::Refused(403))?;
    loop {
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|_| WatchError::BadUrl(hub_url.to_string()))?;
        req.headers_mut().insert("authorization", auth.clone());
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, _)) => {
                eprintln!("watching {device_id} on {base} (Ctrl-C to stop)");
                while let Some(msg) = ws.next().await {
                    match msg {
                        Ok(Message::Text(t)) => {
                            if let Some(line) = format_line(&t) {
                                println!("{line}");
                            }
                        }
                        Ok(Message::Close(f)) => {
                            eprintln!("hub closed the feed: {f:?}");
                            break;
                        }
                        Ok(Message::Ping(p)) => {
                            let _ = ws.send(Message::Pong(p)).await;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("feed error: {e}");
                            break;
                        }
                    }
                }
            }
            Err(WsError::Http(resp)) if resp.status().is_client_error() => {
                return Err(WatchError::Refused(resp.status().as_u16()));
            }
            Err(e) => eprintln!(
                "cannot reach the hub yet: {}",
                WatchError::Network(e.to_string())
            ),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_reading() {
        let f = r#"{"type":"reading","epoch":1,"seq":7,"ts_ms":1000,"meter":"main","voltage_v":230.14,"power_w":960.5,"energy_wh":1523400.0,"device_id":"d","rx_ms":1012}"#;
        assert_eq!(
            format_line(f).unwrap(),
            "d main seq=7  230.1 V  960.5 W  1523.400 kWh  (age 12 ms)"
        );
        assert!(format_line("nope").is_none());
        let every = r#"{"type":"reading","seq":1,"meter":"m","voltage_v":1,"current_a":2,"power_w":3,"energy_wh":4000,"frequency_hz":5,"power_factor":0.5,"reactive_power_var":7,"device_id":"d"}"#;
        assert_eq!(
            format_line(every).unwrap(),
            "d m seq=1  1.0 V  2.00 A  3.0 W  4.000 kWh  5.00 Hz  0.50 PF  7.0 var"
        );
    }
}
