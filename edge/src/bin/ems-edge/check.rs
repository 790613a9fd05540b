//! `ems-edge check`: validates the config, finds the token, resolves the hub
//! and performs the authenticated handshake once, then closes (1000) without
//! streaming. Prints one line per step; the token is never printed.

use std::io::{self, Write};
use std::path::Path;
use std::time::Instant;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

use ems_edge::config::{Config, DeviceToken};
use ems_edge::link::{self, ConnectError, Target};

/// Runs the checks, writing a report to `out`. Returns whether all passed.
pub fn check(config_path: &Path, out: &mut dyn Write) -> io::Result<bool> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            writeln!(out, "FAIL config: {e}")?;
            return Ok(false);
        }
    };
    let ids: Vec<&str> = config.meters.iter().map(|m| m.id()).collect();
    writeln!(
        out,
        "ok   config {}: device {}, {} meter(s) [{}], spool {}",
        config_path.display(),
        config.device_id,
        ids.len(),
        ids.join(", "),
        config.spool_dir.display()
    )?;
    if !config.hub.tls {
        writeln!(
            out,
            "warn hub_url uses ws:// (allow_insecure): traffic is unencrypted"
        )?;
    }
    let token = match DeviceToken::from_env() {
        Ok(t) => t,
        Err(e) => {
            writeln!(out, "FAIL token: {e}")?;
            return Ok(false);
        }
    };
    writeln!(out, "ok   device token present (not shown)")?;
    let tls = match link::tls_config(config.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            writeln!(out, "FAIL {e}")?;
            return Ok(false);
        }
    };
    match link::resolve(&config.hub) {
        Ok(addrs) => {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            writeln!(
                out,
                "ok   resolved {}: {}",
                config.hub.host,
                list.join(", ")
            )?;
        }
        Err(e) => {
            writeln!(out, "FAIL {e} (check DNS and the hub_url host)")?;
            return Ok(false);
        }
    }
    let target = Target {
        hub: config.hub.clone(),
        token,
        tls,
        connect_timeout: config.link.connect_timeout,
        ack_window: config.ack_window,
    };
    let started = Instant::now();
    match link::connect(&target) {
        Ok((mut ws, _)) => {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            writeln!(
                out,
                "ok   handshake with {} accepted (101) in {ms:.0} ms",
                config.hub.url
            )?;
            let _ = ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "check done".into(),
            }));
            let _ = ws.flush();
            Ok(true)
        }
        Err(e) => {
            let hint = match &e {
                ConnectError::Unauthorized(_) => {
                    " — provision the device on the hub (`ems-hub device add ID`) and put its token in EMS_DEVICE_TOKEN"
                }
                ConnectError::Connect { .. } | ConnectError::Timeout => {
                    " — is the hub running and reachable on that port (firewall)?"
                }
                ConnectError::Handshake(_) => {
                    " — for a private CA or self-signed hub set ca_file"
                }
                _ => "",
            };
            writeln!(out, "FAIL {}: {e}{hint}", config.hub.url)?;
            Ok(false)
        }
    }
}
