//! `ems-hub export`: a device's stored readings on stdout, as CSV (the
//! same columns as `GET /api/devices/{id}/readings.csv`) or JSON Lines,
//! paged through the store in `(ts, epoch, seq)` order so that memory stays
//! constant whatever the range. A closed stdout (`| head`) ends the export
//! quietly.

use std::io::{self, BufWriter, Write};

use anyhow::Context;
use ems_hub::energy::csv::{write_csv_header, write_csv_row, write_jsonl_row, ExportRow};
use ems_hub::energy::rule::ReadingKey;

use crate::cli::{ExportArgs, ExportFormat};

/// Readings per store query.
const PAGE: usize = 8192;

/// Runs `ems-hub export` against `db`.
pub fn run(db: &str, args: ExportArgs) -> anyhow::Result<()> {
    ems_shared::validate_device_id(&args.device)
        .with_context(|| format!("--device {:?}", args.device))?;
    let (from, to) = (args.from.unwrap_or(i64::MIN), args.to.unwrap_or(i64::MAX));
    if from > to {
        anyhow::bail!("--from must not be after --to");
    }
    let mut store = ems_hub::store::open(db)?;
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 18, stdout);
    let written = (|| -> anyhow::Result<()> {
        if args.format == ExportFormat::Csv {
            write_csv_header(&mut out)?;
        }
        let mut after: Option<ReadingKey> = None;
        loop {
            let page = store.export_page(&args.device, from, to, after, PAGE)?;
            for r in &page {
                let row = ExportRow {
                    device_id: &args.device,
                    reading: &r.reading,
                    flags: r.flags,
                };
                match args.format {
                    ExportFormat::Csv => write_csv_row(&mut out, &row)?,
                    ExportFormat::Jsonl => write_jsonl_row(&mut out, &row)?,
                }
            }
            if page.len() < PAGE {
                break;
            }
            after = page.last().map(|r| ReadingKey {
                ts_ms: r.reading.ts_ms,
                epoch: r.reading.epoch,
                seq: r.reading.seq,
            });
        }
        out.flush()?;
        Ok(())
    })();
    match written {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}
