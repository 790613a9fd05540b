//! `ems-hub quarantine list [--device ID] [--limit N]`: the quarantined
//! frames, newest first, one tab-separated line each:
//! `DEVICE  RECEIVED_AT  EPOCH  SEQ  REASON  DETAIL  RAW` — the receive
//! time in RFC 3339 (UTC), `-` for a missing epoch, seq or raw text, and
//! tabs, line breaks and other control characters in the detail and raw
//! text escaped (`\t`, `\n`, `\u{1b}`) so that every row is one line.

use anyhow::Context;
use ems_hub::store::Quarantined;

use crate::cli::QuarantineCmd;

/// Runs `ems-hub quarantine …` against `db`.
pub fn run(db: &str, cmd: QuarantineCmd) -> anyhow::Result<()> {
    match cmd {
        QuarantineCmd::List { device, limit } => {
            if let Some(d) = &device {
                ems_shared::validate_device_id(d).with_context(|| format!("--device {d:?}"))?;
            }
            let mut store = ems_hub::store::open(db)?;
            for q in store.quarantined(device.as_deref(), limit as usize)? {
                println!("{}", line(&q));
            }
        }
    }
    Ok(())
}

/// One row as a tab-separated line.
fn line(q: &Quarantined) -> String {
    let at = jiff::Timestamp::from_millisecond(q.received_at_ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| q.received_at_ms.to_string());
    let id = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    format!(
        "{}\t{at}\t{}\t{}\t{}\t{}\t{}",
        q.device_id,
        id(q.epoch),
        id(q.seq),
        q.reason,
        escaped(&q.detail),
        q.raw.as_deref().map_or_else(|| "-".to_string(), escaped),
    )
}

/// `s` with control characters escaped, so it stays one field of a line.
fn escaped(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tab_separated_and_one_line_each() {
        let q = Quarantined {
            device_id: "ems_001".into(),
            received_at_ms: 1_700_000_000_123,
            epoch: Some(7),
            seq: Some(2),
            reason: "out_of_range".into(),
            detail: "power_factor 2 is out of range".into(),
            raw: Some("{\"a\":\t1}\n".into()),
        };
        assert_eq!(
            line(&q),
            "ems_001\t2023-11-14T22:13:20.123Z\t7\t2\tout_of_range\t\
             power_factor 2 is out of range\t{\"a\":\\t1}\\n"
        );
        let q = Quarantined {
            epoch: None,
            seq: None,
            raw: None,
            ..q
        };
        assert!(line(&q).contains("\t-\t-\tout_of_range\t"));
        assert!(line(&q).ends_with("\t-"));
    }
}
