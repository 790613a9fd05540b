//! `ems-hub export`: a device's stored readings on stdout, as CSV (the
//! same columns as `GET /api/devices/{id}/readings.csv`) or JSON Lines,
//! paged through the store in `(ts, epoch, seq)` order so that memory stays
//! constant whatever the range. A second thread reads the next page while
//! this one writes the current one (at most three pages in memory). A
//! closed stdout (`| head`) ends the export quietly.

use std::io::{self, BufWriter, Write};
use std::sync::mpsc;
use std::thread;

use anyhow::Context;
use ems_hub::energy::csv::{write_csv_header, write_csv_row, write_jsonl_row, ExportRow};
use ems_hub::energy::rule::ReadingKey;
use ems_hub::store::energy::FlaggedReading;
use ems_hub::store::{Store, StoreError};

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
    let store = ems_hub::store::open(db)?;
    let (tx, pages) = mpsc::sync_channel(1);
    let device = args.device.clone();
    let reader = thread::spawn(move || read_pages(store, &device, from, to, &tx));
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 18, stdout);
    let written = (|| -> anyhow::Result<()> {
        if args.format == ExportFormat::Csv {
            write_csv_header(&mut out)?;
        }
        for page in &pages {
            for r in &page? {
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
        }
        out.flush()?;
        Ok(())
    })();
    // Dropping the receiver stops the reader at its next page.
    drop(pages);
    if reader.join().is_err() {
        anyhow::bail!("the store reader thread panicked");
    }
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

/// Sends the range's pages in order until it is done, the receiver is gone
/// or the store fails (the error is the last message).
fn read_pages(
    mut store: Box<dyn Store>,
    device: &str,
    from: i64,
    to: i64,
    tx: &mpsc::SyncSender<Result<Vec<FlaggedReading>, StoreError>>,
) {
    let mut after: Option<ReadingKey> = None;
    loop {
        let page = store.export_page(device, from, to, after, PAGE);
        let done = page.as_ref().map_or(true, |p| p.len() < PAGE);
        after = page
            .as_ref()
            .ok()
            .and_then(|p| p.last().map(FlaggedReading::key));
        if tx.send(page).is_err() || done {
            return;
        }
    }
}
