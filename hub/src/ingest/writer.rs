//! The cold path: a background thread that owns a store handle, takes
//! readings (and refused frames for the quarantine) from a bounded queue,
//! commits them in batches and then answers the devices.
//!
//! - The writer holds what it takes from the queue in per-device runs
//!   ([`runs`](super::runs)). A device that announced its ack window is
//!   held for half of it, at most `batch_linger` (default 2 s): a 1 Hz
//!   device's two or three readings then share one page write of each
//!   index and one ack. Any other device's run is due once it holds
//!   `batch_run` items (default 1) or its first item has waited
//!   `batch_linger`. The writer looks at its queue every
//!   10 ms while it holds anything, gathers the due runs and commits them
//!   every 100 ms —
//!   at once when a run is urgent (a draining backlog), when the batch
//!   is full, or when asked ([`WriterControl`]: a device's ping, a
//!   dashboard resume, the shutdown), which also takes every run. A batch
//!   is at most `batch_max_rows` items and one transaction: its readings
//!   and its quarantine rows commit together or not at all. When an ack
//!   may come is part of the protocol (`docs/protocol.md`, ack timing);
//!   the edge keeps every unacked reading meanwhile (in memory within the
//!   window it announced, on its card after it).
//! - A commit that fails because the store is unwell ([`StoreError::Db`]:
//!   connection lost, disk full, locked) is retried with backoff until it
//!   succeeds; answers are withheld meanwhile, the queue fills, and device
//!   sessions stop reading their sockets (backpressure) — nothing is
//!   dropped.
//! - A commit the database refuses for the data itself
//!   ([`StoreError::Refused`]: a check or trigger raised, a value it cannot
//!   hold) would fail the same way for ever, so the batch is split in
//!   halves until the refused rows are alone; each refused reading goes to
//!   quarantine (`store_error`, the database's message as detail) and the
//!   rest commits. See `docs/operations/faults.md`.
//! - Answers go out only after the commit that decided them, in this
//!   order: `rejected` for every quarantined row with an epoch/seq, then
//!   per connection and epoch one cumulative ack with the seq of the last
//!   stored reading in arrival order (see the ack semantics in
//!   `ems-shared`). A `rejected` never trails an ack that covers it.
//! - A reading that is neither stored nor quarantined (the hub gave up at
//!   shutdown, or the database refused its quarantine row too) must never
//!   be covered by a later cumulative ack: its connection's mailbox is
//!   abandoned ([`Mailbox::abandon`]) — no answer follows, the session
//!   closes the connection and the edge sends everything unacked again.
//! - The thread exits once every queue sender is dropped and the queue is
//!   drained, so a graceful shutdown flushes everything it received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use super::runs::{Held, Pick, Runs};
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::shutdown::shutting_down;
use crate::store::{QuarantineReason, QuarantineRow, ReadingSink, Row, StoreError};

/// What a queued item asks the writer to store.
#[derive(Debug)]
pub enum Entry {
    /// A valid reading, for `readings`.
    Reading(Row),
    /// A refused frame, for `quarantine` (boxed: rare, and the queue's
    /// items stay the size of a reading).
    Quarantine(Box<QuarantineRow>),
}

/// One queued item.
#[derive(Debug)]
pub struct Item {
    /// What to store.
    pub entry: Entry,
    /// Who to answer.
    pub ack: Arc<Mailbox>,
}

impl Held for Item {
    fn device(&self) -> &Arc<str> {
        match &self.entry {
            Entry::Reading(row) => &row.device_id,
            Entry::Quarantine(q) => &q.device_id,
        }
    }

    fn hold(&self) -> Option<Duration> {
        self.ack.hold()
    }
}

/// Batching parameters.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most rows per transaction.
    pub batch_max_rows: usize,
    /// Longest a device's reading is held before it is committed.
    pub batch_linger: Duration,
    /// Readings of one device committed together (a run).
    pub batch_run: usize,
}

/// How often a writer that holds runs looks at its queue: a hundred
/// wake-ups a second of one thread.
const POLL: Duration = Duration::from_millis(10);

/// How often the writer commits the due runs it gathered (unless a batch
/// fills, a run is urgent, or a flush asks): each commit rewrites the
/// pages every row shares (the table's last leaf, the time index's, the
/// WAL header) and syncs; at 3,000 readings/s a commit per 100 ms instead
/// of per 10 ms took the writer from 27 to 16 µs per reading
/// (docs/development/benchmarks.md).
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// How many items the writer holds, in batches of `batch_max_rows`, before
/// it commits runs that are not due yet and stops taking from its queue
/// (which then fills: backpressure).
const HOLD_BATCHES: usize = 4;

/// What the rest of the hub may ask of the writer thread, and what it
/// reports back: shared between the writer and the hub's state.
#[derive(Debug, Default)]
pub struct WriterControl {
    /// Commit everything held at the next look at the queue (taken by
    /// that look).
    flush: AtomicBool,
    /// Commit everything held at every look from now on (the hub is
    /// shutting down: its sessions wait for their last acks).
    hurry: AtomicBool,
    /// Items taken from the queue and not yet answered.
    holding: AtomicUsize,
}

impl WriterControl {
    /// Asks the writer to commit everything it holds at its next look,
    /// due or not.
    pub fn flush(&self) {
        self.flush.store(true, Ordering::Relaxed);
    }

    /// Makes the writer commit everything it holds at every look, for
    /// good.
    pub fn hurry(&self) {
        self.hurry.store(true, Ordering::Relaxed);
    }

    /// Items the writer has taken from its queue and not yet answered.
    pub fn holding(&self) -> usize {
        self.holding.load(Ordering::Relaxed)
    }

    /// Whether this look commits everything; takes a flush request.
    fn close_now(&self) -> bool {
        self.hurry.load(Ordering::Relaxed) || self.flush.swap(false, Ordering::Relaxed)
    }
}

/// Handle to the writer thread.
pub struct Writer {
    join: JoinHandle<()>,
}

impl Writer {
    /// Starts the writer on its own thread. It stops once `stop` is set (or
    /// every sender is dropped) and the queue is drained.
    pub fn spawn(
        store: impl ReadingSink + 'static,
        rx: mpsc::Receiver<Item>,
        cfg: WriterConfig,
        stop: watch::Receiver<bool>,
        rt: Handle,
    ) -> std::io::Result<Writer> {
        let parts = (Arc::new(Metrics::new()), Arc::default());
        Self::spawn_with_metrics(store, rx, cfg, stop, rt, parts)
    }

    /// Like [`Writer::spawn`], recording batch sizes, commit latency,
    /// failures, store health, quarantined rows and the queue depth in
    /// `metrics`, and taking requests through `control`.
    pub fn spawn_with_metrics(
        store: impl ReadingSink + 'static,
        rx: mpsc::Receiver<Item>,
        cfg: WriterConfig,
        stop: watch::Receiver<bool>,
        rt: Handle,
        (metrics, control): (Arc<Metrics>, Arc<WriterControl>),
    ) -> std::io::Result<Writer> {
        let join = std::thread::Builder::new()
            .name("ems-writer".into())
            .spawn(move || run(store, rx, cfg, stop, rt, (&metrics, &control)))?;
        Ok(Writer { join })
    }

    /// Waits for the thread to finish (blocking).
    pub fn join(self) {
        if self.join.join().is_err() {
            log::error!("store writer thread panicked");
        }
    }
}

/// One batch: the readings and the quarantine rows, each side by side
/// with who to answer (no copy of a row).
#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    row_acks: Vec<Arc<Mailbox>>,
    quarantine: Vec<QuarantineRow>,
    quarantine_acks: Vec<Arc<Mailbox>>,
}

impl Batch {
    fn push(&mut self, item: Item) {
        match item.entry {
            Entry::Reading(row) => {
                self.rows.push(row);
                self.row_acks.push(item.ack);
            }
            Entry::Quarantine(q) => {
                self.quarantine.push(*q);
                self.quarantine_acks.push(item.ack);
            }
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.quarantine.len()
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.row_acks.clear();
        self.quarantine.clear();
        self.quarantine_acks.clear();
    }
}

fn run(
    mut store: impl ReadingSink,
    mut rx: mpsc::Receiver<Item>,
    cfg: WriterConfig,
    mut stop: watch::Receiver<bool>,
    rt: Handle,
    (metrics, control): (&Metrics, &WriterControl),
) {
    lower_priority();
    let max = cfg.batch_max_rows.max(1);
    // (The vectors grow to the largest batch seen, not to `max` up front.)
    let mut batch = Batch {
        rows: Vec::with_capacity(max.min(1024)),
        row_acks: Vec::with_capacity(max.min(1024)),
        ..Batch::default()
    };
    let mut ctx = Retry {
        metrics,
        stop: stop.clone(),
        give_up_at: None,
    };
    let mut runs = Runs::new(cfg.batch_run, cfg.batch_linger);
    let hold_max = max.saturating_mul(HOLD_BATCHES);
    // A linger shorter than the cadence shortens it: with a run of 1 and a
    // linger of 5 ms every reading commits within about 5 ms.
    let (poll, commit_every) = (
        POLL.min(cfg.batch_linger),
        COMMIT_EVERY.min(cfg.batch_linger),
    );
    // When the batch began to gather due runs.
    let mut gathered_at: Option<Instant> = None;
    loop {
        if runs.is_empty() && batch.len() == 0 {
            // Nothing held: sleep until the next item (no wake-ups idle).
            let first = rt.block_on(async {
                tokio::select! {
                    biased;
                    item = rx.recv() => item,
                    _ = shutting_down(&mut stop) => {
                        // No new readings from now on; drain what is queued.
                        rx.close();
                        rx.recv().await
                    }
                }
            });
            let Some(first) = first else {
                log::debug!("store writer: queue closed and drained");
                return;
            };
            runs.take(first, Instant::now());
        }
        let now = Instant::now();
        let mut closed = false;
        while runs.len() < hold_max {
            match rx.try_recv() {
                Ok(item) => runs.take(item, now),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let all = closed || control.close_now() || *stop.borrow();
        let pick = if all {
            Pick::All
        } else {
            Pick::Due { hold_max }
        };
        let room = max.saturating_sub(batch.len());
        runs.pick(pick, now, room, |item| batch.push(item));
        control
            .holding
            .store(runs.len() + batch.len(), Ordering::Relaxed);
        let urgent = runs.urgent();
        let commit = match batch.len() {
            0 => false,
            n => {
                let since = *gathered_at.get_or_insert(now);
                all || n >= max || urgent || now.saturating_duration_since(since) >= commit_every
            }
        };
        if !commit {
            // Sleep, then take what queued up, instead of a wake-up per
            // reading (docs/decisions/hub-store-writer-thread.md).
            std::thread::sleep(poll);
            continue;
        }
        let settled = settle(&mut store, &batch, &mut ctx);
        answer(&batch, &settled, metrics);
        batch.clear();
        gathered_at = None;
        control.holding.store(runs.len(), Ordering::Relaxed);
    }
}

/// Runs the writer below the live path: on a busy core the scheduler then
/// prefers the threads that move readings to dashboards, and the writer
/// takes the slack (a backlog drained after a database pause delayed live
/// frames by up to 0.2 s; docs/decisions/hub-store-writer-thread.md). Acks
/// are bounded by the commit anyway; a niced writer still gets its share
/// when the core is saturated.
fn lower_priority() {
    // Linux: `setpriority(PRIO_PROCESS, tid)` sets one thread's nice value.
    // Relative to the current one, so a hub started with `Nice=` in its
    // unit keeps the writer below its other threads (raising the nice value
    // needs no privilege; lowering it would).
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on this thread's own id.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + WRITER_NICE).min(19))
        };
        if r != 0 {
            log::debug!(
                "store writer: cannot lower its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// How much nicer than the rest of the hub the writer thread runs (Linux).
#[cfg(target_os = "linux")]
const WRITER_NICE: libc::c_int = 5;

/// How long a failing commit is retried once the hub is shutting down.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(5);

/// What became of one row of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Committed where it belongs (`readings`, or `quarantine` for a
    /// quarantine row).
    Stored,
    /// A reading the database refused, committed to `quarantine` instead.
    Quarantined,
    /// Neither: the hub gave up at shutdown, or the database refused its
    /// quarantine row too. Never acked; its connection is abandoned.
    Abandoned,
}

/// The outcome of a batch.
enum Settled {
    /// Everything committed in one transaction (the normal case; nothing
    /// is allocated for it).
    All,
    /// Row by row, after a refusal or a give-up: the fate of each reading
    /// and each quarantine row, and the `store_error` quarantine row of
    /// each reading the database refused (by reading index).
    Each {
        rows: Vec<Fate>,
        quarantine: Vec<Fate>,
        converted: Vec<(usize, QuarantineRow)>,
    },
}

/// Why a write did not commit.
enum Failure {
    /// The database refused the data (retrying cannot help).
    Refused(String),
    /// The store stayed unwell past the shutdown deadline.
    GaveUp,
}

/// The retry state shared by every write of the writer.
struct Retry<'a> {
    metrics: &'a Metrics,
    stop: watch::Receiver<bool>,
    /// Set once the hub is stopping and the store keeps failing.
    give_up_at: Option<Instant>,
}

/// Commits `batch`: in one transaction when the store takes it, else row
/// by row as far as needed (see the module docs).
fn settle(store: &mut dyn ReadingSink, batch: &Batch, ctx: &mut Retry<'_>) -> Settled {
    let started = Instant::now();
    let first = match write(store, &batch.rows, &batch.quarantine, ctx) {
        Ok(()) => {
            ctx.metrics.committed(batch.len(), started.elapsed());
            return Settled::All;
        }
        Err(f) => f,
    };
    let (n_rows, n_quarantine) = (batch.rows.len(), batch.quarantine.len());
    let mut rows = vec![Fate::Stored; n_rows];
    let mut quarantine = vec![Fate::Stored; n_quarantine];
    let mut refused = Vec::new();
    match first {
        Failure::GaveUp => {
            rows.fill(Fate::Abandoned);
            quarantine.fill(Fate::Abandoned);
        }
        Failure::Refused(e) => {
            ctx.metrics
                .quarantine
                .batches_split
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "store writer: the database refused a batch of {} ({e}); isolating the refused rows",
                batch.len()
            );
            // The refusal names no row: with both kinds in the batch,
            // each kind is tried on its own first.
            let known = |other: usize| (other == 0).then(|| e.clone());
            split(
                store,
                &batch.rows,
                0,
                known(n_quarantine),
                ctx,
                &mut |i, f| match f {
                    Split::Refused(msg) => refused.push((i, msg)),
                    Split::Abandoned => rows[i] = Fate::Abandoned,
                },
            );
            split(
                store,
                &batch.quarantine,
                0,
                known(n_rows),
                ctx,
                &mut |i, _| quarantine[i] = Fate::Abandoned,
            );
        }
    }
    let converted = quarantine_refused(store, batch, &refused, &mut rows, ctx);
    count_fates(&rows, &quarantine, converted.len(), started, ctx);
    Settled::Each {
        rows,
        quarantine,
        converted,
    }
}

/// Each reading the database refused goes to quarantine instead (all in
/// one transaction, split again if need be): its fate becomes
/// `Quarantined`, or `Abandoned` when its quarantine row is refused too.
/// Returns the quarantined ones with their rows.
fn quarantine_refused(
    store: &mut dyn ReadingSink,
    batch: &Batch,
    refused: &[(usize, String)],
    rows: &mut [Fate],
    ctx: &mut Retry<'_>,
) -> Vec<(usize, QuarantineRow)> {
    // Each refused reading goes to quarantine instead, together.
    let mut converted: Vec<(usize, QuarantineRow)> = refused
        .iter()
        .map(|(i, msg)| (*i, QuarantineRow::store_error(&batch.rows[*i], msg)))
        .collect();
    if !converted.is_empty() {
        let qrows: Vec<QuarantineRow> = converted.iter().map(|(_, q)| q.clone()).collect();
        let mut ok = vec![true; qrows.len()];
        split(store, &qrows, 0, None, ctx, &mut |k, _| ok[k] = false);
        for (k, (i, q)) in converted.iter().enumerate() {
            rows[*i] = if ok[k] {
                Fate::Quarantined
            } else {
                Fate::Abandoned
            };
            if ok[k] {
                log::warn!(
                    "store writer: reading {} {}/{} refused by the database, quarantined: {}",
                    q.device_id,
                    row_id(q.epoch),
                    row_id(q.seq),
                    crate::log_text::escape(&q.detail)
                );
            }
        }
        converted.retain(|(i, _)| rows[*i] == Fate::Quarantined);
    }
    converted
}

/// Counts a settled batch: committed rows (stored and newly quarantined)
/// and the abandoned ones, with an error line for the latter.
fn count_fates(
    rows: &[Fate],
    quarantine: &[Fate],
    converted: usize,
    started: Instant,
    ctx: &mut Retry<'_>,
) {
    let stored = rows.iter().filter(|f| **f == Fate::Stored).count()
        + quarantine.iter().filter(|f| **f == Fate::Stored).count();
    if stored + converted > 0 {
        ctx.metrics.committed(stored + converted, started.elapsed());
    }
    let abandoned = rows.iter().filter(|f| **f == Fate::Abandoned).count()
        + quarantine.iter().filter(|f| **f == Fate::Abandoned).count();
    if abandoned > 0 {
        ctx.metrics
            .quarantine
            .abandoned
            .fetch_add(abandoned as u64, Ordering::Relaxed);
        log::error!(
            "store writer: {abandoned} readings or refused frames neither stored nor quarantined; \
             closing their connections unacknowledged so the devices send them again"
        );
    }
}

fn row_id(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// What [`split`] reports for one row that did not commit.
enum Split {
    /// The database refused this row alone, with this message.
    Refused(String),
    /// Given up at shutdown.
    Abandoned,
}

/// A slice of one kind of row that [`split`] can write on its own.
trait Part: Sized {
    fn write_part(
        store: &mut dyn ReadingSink,
        part: &[Self],
        ctx: &mut Retry<'_>,
    ) -> Result<(), Failure>;
}

impl Part for Row {
    fn write_part(
        store: &mut dyn ReadingSink,
        part: &[Self],
        ctx: &mut Retry<'_>,
    ) -> Result<(), Failure> {
        write(store, part, &[], ctx)
    }
}

impl Part for QuarantineRow {
    fn write_part(
        store: &mut dyn ReadingSink,
        part: &[Self],
        ctx: &mut Retry<'_>,
    ) -> Result<(), Failure> {
        write(store, &[], part, ctx)
    }
}

/// Commits `part` (rows `base..` of the batch), halving it on every
/// refusal until each refused row is alone; reports each row that did not
/// commit to `failed`. `known`: the part is already known to be refused
/// with this message (it is not written again as a whole). A part of n
/// rows with one refused row costs about 2·log2(n) transactions.
fn split<T: Part>(
    store: &mut dyn ReadingSink,
    part: &[T],
    base: usize,
    known: Option<String>,
    ctx: &mut Retry<'_>,
    failed: &mut dyn FnMut(usize, Split),
) {
    if part.is_empty() {
        return;
    }
    let result = match known {
        Some(e) => Err(Failure::Refused(e)),
        None => T::write_part(store, part, ctx),
    };
    match result {
        Ok(()) => {}
        Err(Failure::GaveUp) => (base..base + part.len()).for_each(|i| failed(i, Split::Abandoned)),
        Err(Failure::Refused(e)) if part.len() == 1 => failed(base, Split::Refused(e)),
        Err(Failure::Refused(_)) => {
            let mid = part.len() / 2;
            split(store, &part[..mid], base, None, ctx, failed);
            split(store, &part[mid..], base + mid, None, ctx, failed);
        }
    }
}

/// Writes `rows` and `quarantine` in one transaction, retrying with capped
/// exponential backoff while the store is unwell. Dedup on (device_id,
/// epoch, seq) makes a retry after an ambiguous failure safe. Returns
/// [`Failure::Refused`] at once when the database refuses the data, and
/// [`Failure::GaveUp`] only when the hub is shutting down and the store
/// stayed unwell for [`SHUTDOWN_RETRY`]: those rows are then not acked
/// (their connections are abandoned), so the edges still hold them and
/// resend them to the next hub — the process can exit in bounded time
/// without losing anything.
fn write(
    store: &mut dyn ReadingSink,
    rows: &[Row],
    quarantine: &[QuarantineRow],
    ctx: &mut Retry<'_>,
) -> Result<(), Failure> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    let n = rows.len() + quarantine.len();
    loop {
        match store.write_batch(rows, quarantine) {
            Ok(()) => {
                if attempt > 0 {
                    log::info!("store writer: batch of {n} committed after {attempt} retries");
                }
                return Ok(());
            }
            Err(StoreError::Refused(e)) => {
                ctx.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                return Err(Failure::Refused(e));
            }
            Err(e) => {
                if *ctx.stop.borrow() {
                    // One deadline for the whole shutdown, not per batch.
                    let deadline = *ctx
                        .give_up_at
                        .get_or_insert_with(|| Instant::now() + SHUTDOWN_RETRY);
                    if Instant::now() >= deadline {
                        log::error!(
                            "store writer: giving up on {n} unacknowledged readings at shutdown ({e}); \
                             the devices keep them and resend them"
                        );
                        return Err(Failure::GaveUp);
                    }
                }
                attempt += 1;
                ctx.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.store_writer_ok.store(0, Ordering::Relaxed);
                if attempt == 1 || attempt.is_power_of_two() {
                    log::error!(
                        "store writer: commit of {n} readings failed (attempt {attempt}), retrying: {e}"
                    );
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Answers the devices once `batch` is settled: abandons the mailboxes of
/// connections with a row that went nowhere, then `rejected` for every
/// quarantined row with an epoch/seq, then the cumulative acks of the
/// stored readings.
fn answer(batch: &Batch, settled: &Settled, metrics: &Metrics) {
    let stored = |fates: Option<&Vec<Fate>>, i: usize| {
        fates.map_or(true, |f| f.get(i) == Some(&Fate::Stored))
    };
    let (row_fates, quarantine_fates, converted) = match settled {
        Settled::All => (None, None, &[][..]),
        Settled::Each {
            rows,
            quarantine,
            converted,
        } => {
            let gone = |f: &Fate| *f == Fate::Abandoned;
            for (sink, _) in batch.row_acks.iter().zip(rows).filter(|(_, f)| gone(f)) {
                sink.abandon();
            }
            for (sink, _) in batch
                .quarantine_acks
                .iter()
                .zip(quarantine)
                .filter(|(_, f)| gone(f))
            {
                sink.abandon();
            }
            (Some(rows), Some(quarantine), &converted[..])
        }
    };
    for (i, (q, sink)) in batch
        .quarantine
        .iter()
        .zip(&batch.quarantine_acks)
        .enumerate()
    {
        if stored(quarantine_fates, i) {
            metrics.quarantined(q.reason);
            if let Some((epoch, seq, reason)) = q.answer() {
                sink.push_rejected(epoch, seq, &reason);
            }
        }
    }
    for (i, q) in converted {
        metrics.quarantined(QuarantineReason::StoreError);
        if let (Some((epoch, seq, reason)), Some(sink)) = (q.answer(), batch.row_acks.get(*i)) {
            sink.push_rejected(epoch, seq, &reason);
        }
    }
    // (conn_id, epoch) -> (sink, last stored seq in arrival order)
    let mut acks: HashMap<(u64, u64), (&Arc<Mailbox>, u64)> =
        HashMap::with_capacity(batch.rows.len().min(1024));
    for (i, (row, sink)) in batch.rows.iter().zip(&batch.row_acks).enumerate() {
        if stored(row_fates, i) {
            let key = (sink.conn_id, row.reading.epoch);
            acks.insert(key, (sink, row.reading.seq));
        }
    }
    for ((_, epoch), (sink, seq)) in acks {
        // The connection may have closed meanwhile; its readings are
        // stored and the mailbox goes with the last reference. An
        // abandoned mailbox takes nothing more.
        sink.push((epoch, seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Answer;
    use ems_shared::{FrameError, Reading, RejectReason};
    use std::sync::Mutex;

    /// A store that records committed seqs and fails the first `fail` commits.
    struct Recording {
        committed: Arc<Mutex<Vec<Vec<u64>>>>,
        fail: u32,
    }

    impl ReadingSink for Recording {
        fn write_batch(&mut self, rows: &[Row], _: &[QuarantineRow]) -> Result<(), StoreError> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(StoreError::Db("injected".into()));
            }
            self.committed
                .lock()
                .unwrap()
                .push(rows.iter().map(|r| r.reading.seq).collect());
            Ok(())
        }
    }

    fn row(epoch: u64, seq: u64) -> Row {
        Row {
            device_id: Arc::from("d"),
            received_at_ms: 0,
            reading: Reading {
                epoch,
                seq,
                meter: "m".into(),
                power_w: Some(1.0),
                ..Default::default()
            },
        }
    }

    fn item(sink: &Arc<Mailbox>, epoch: u64, seq: u64) -> Item {
        Item {
            entry: Entry::Reading(row(epoch, seq)),
            ack: sink.clone(),
        }
    }

    /// Everything in a mailbox, oldest first.
    fn drain(sink: &Mailbox) -> Vec<Answer> {
        std::iter::from_fn(|| sink.try_pop()).collect()
    }

    #[test]
    fn a_dead_store_at_shutdown_is_given_up_without_acks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let committed = Arc::new(Mutex::new(Vec::new()));
        let store = Recording {
            committed: committed.clone(),
            fail: u32::MAX,
        };
        let (tx, rx) = mpsc::channel(100);
        let sink = Arc::new(Mailbox::new(1));
        for seq in 0..3 {
            tx.try_send(item(&sink, 1, seq)).unwrap();
        }
        let cfg = WriterConfig {
            batch_max_rows: 1,
            batch_linger: Duration::from_millis(1),
            batch_run: 2,
        };
        // Already stopping; `tx` stays alive, so only the stop ends it.
        let (_stop_tx, stop_rx) = watch::channel(true);
        let started = Instant::now();
        let w = Writer::spawn(store, rx, cfg, stop_rx, rt.handle().clone()).unwrap();
        w.join();
        // One shutdown deadline for all three batches, not one each.
        assert!(
            started.elapsed() < SHUTDOWN_RETRY * 2,
            "{:?}",
            started.elapsed()
        );
        assert!(committed.lock().unwrap().is_empty());
        // Nothing may be acked; the connection is told to close.
        assert_eq!(drain(&sink), [Answer::Abandoned]);
        drop(tx);
    }

    /// The queue, the control, the committed seqs, the stop flag and the
    /// writer of [`lingering`].
    type Lingering = (
        mpsc::Sender<Item>,
        Arc<WriterControl>,
        Arc<Mutex<Vec<Vec<u64>>>>,
        watch::Sender<bool>,
        Writer,
    );

    /// A writer with a linger far longer than any test, on a `Recording`
    /// store: only the early triggers can close its batches.
    fn lingering(rt: &tokio::runtime::Runtime) -> Lingering {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let store = Recording {
            committed: committed.clone(),
            fail: 0,
        };
        let (tx, rx) = mpsc::channel(1000);
        let cfg = WriterConfig {
            batch_max_rows: 10_000,
            batch_linger: Duration::from_secs(600),
            batch_run: 2,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let control = Arc::new(WriterControl::default());
        let parts = (Arc::new(Metrics::new()), control.clone());
        let w = Writer::spawn_with_metrics(store, rx, cfg, stop_rx, rt.handle().clone(), parts)
            .unwrap();
        (tx, control, committed, stop_tx, w)
    }

    /// Waits (up to 30 s) until `sink` has an answer; returns them all.
    fn answers_within(sink: &Mailbox) -> Vec<Answer> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let got = drain(sink);
            if !got.is_empty() || Instant::now() > until {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A device's second reading makes its run due at once; another
    /// device's single reading keeps waiting for its linger.
    #[test]
    fn a_device_with_two_readings_held_is_committed_without_the_linger() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, control, committed, stop, w) = lingering(&rt);
        let (quiet, busy) = (Arc::new(Mailbox::new(1)), Arc::new(Mailbox::new(2)));
        let mut quiet_item = item(&quiet, 1, 0);
        if let Entry::Reading(row) = &mut quiet_item.entry {
            row.device_id = Arc::from("quiet");
        }
        tx.blocking_send(quiet_item).unwrap();
        tx.blocking_send(item(&busy, 5, 0)).unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while control.holding() < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(control.holding(), 2);
        std::thread::sleep(Duration::from_millis(100));
        assert!(committed.lock().unwrap().is_empty());
        tx.blocking_send(item(&busy, 5, 1)).unwrap();
        assert_eq!(answers_within(&busy), [Answer::Ack(5, 1)]);
        assert_eq!(*committed.lock().unwrap(), [vec![0, 1]]);
        // The writer counts what it holds after it answered.
        let until = Instant::now() + Duration::from_secs(30);
        while control.holding() != 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(control.holding(), 1);
        assert!(drain(&quiet).is_empty());
        stop.send(true).unwrap();
        drop(tx);
        w.join();
        // The stop commits what is still held.
        assert_eq!(drain(&quiet), [Answer::Ack(1, 0)]);
    }

    /// A flush request (a device's ping, a resume) closes the batch at
    /// the next look; the hub's shutdown closes every batch from then on.
    #[test]
    fn a_flush_request_and_the_shutdown_close_a_lingering_batch() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, control, committed, stop, w) = lingering(&rt);
        let sink = Arc::new(Mailbox::new(1));
        tx.blocking_send(item(&sink, 1, 0)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(drain(&sink).is_empty(), "acked before its linger");
        control.flush();
        assert_eq!(answers_within(&sink), [Answer::Ack(1, 0)]);
        // The request was used up by that batch: the next one lingers.
        tx.blocking_send(item(&sink, 1, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(drain(&sink).is_empty(), "a flush request counted twice");
        control.hurry();
        assert_eq!(answers_within(&sink), [Answer::Ack(1, 1)]);
        tx.blocking_send(item(&sink, 1, 2)).unwrap();
        assert_eq!(answers_within(&sink), [Answer::Ack(1, 2)]);
        assert_eq!(*committed.lock().unwrap(), [vec![0], vec![1], vec![2]]);
        stop.send(true).unwrap();
        drop(tx);
        w.join();
    }

    /// A store that fails every attempt at a batch holding seq `bad` and
    /// commits every other batch.
    struct FailsOne {
        bad: u64,
        committed: Arc<Mutex<Vec<Vec<u64>>>>,
    }

    impl ReadingSink for FailsOne {
        fn write_batch(&mut self, rows: &[Row], _: &[QuarantineRow]) -> Result<(), StoreError> {
            if rows.iter().any(|r| r.reading.seq == self.bad) {
                return Err(StoreError::Db("injected outage".into()));
            }
            self.committed
                .lock()
                .unwrap()
                .push(rows.iter().map(|r| r.reading.seq).collect());
            Ok(())
        }
    }

    /// At shutdown the writer gives up on batch [0, 1] and then commits
    /// [2, 3] and [4, 5]: no ack may reach the connection that covers seq
    /// 1 (cumulative acks), so the edge keeps 0 and 1 and sends them again.
    #[test]
    fn a_batch_given_up_at_shutdown_is_never_covered_by_a_later_ack() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let committed = Arc::new(Mutex::new(Vec::new()));
        let store = FailsOne {
            bad: 1,
            committed: committed.clone(),
        };
        let (tx, rx) = mpsc::channel(100);
        let sink = Arc::new(Mailbox::new(1));
        for seq in 0..6 {
            tx.try_send(item(&sink, 7, seq)).unwrap();
        }
        let cfg = WriterConfig {
            batch_max_rows: 2,
            batch_linger: Duration::from_millis(1),
            batch_run: 2,
        };
        let (_stop_tx, stop_rx) = watch::channel(true);
        let w = Writer::spawn(store, rx, cfg, stop_rx, rt.handle().clone()).unwrap();
        w.join();
        drop(tx);
        assert_eq!(*committed.lock().unwrap(), vec![vec![2, 3], vec![4, 5]]);
        let answers = drain(&sink);
        assert!(
            !answers
                .iter()
                .any(|a| matches!(a, Answer::Ack(7, seq) if *seq >= 1)),
            "an ack covers the uncommitted seq 1: {answers:?}"
        );
        assert_eq!(answers, [Answer::Abandoned]);
    }

    #[test]
    fn batches_commit_before_acks_and_retry_failures() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let committed = Arc::new(Mutex::new(Vec::new()));
        let store = Recording {
            committed: committed.clone(),
            fail: 2,
        };
        let (tx, rx) = mpsc::channel(100);
        let sink = Arc::new(Mailbox::new(1));
        // Queue everything first so it forms one batch of 3 (max 3).
        for seq in 0..5 {
            tx.try_send(item(&sink, 7, seq)).unwrap();
        }
        drop(tx);
        let cfg = WriterConfig {
            batch_max_rows: 3,
            batch_linger: Duration::from_millis(1),
            batch_run: 2,
        };
        let (_stop_tx, stop_rx) = watch::channel(false);
        let w = Writer::spawn(store, rx, cfg, stop_rx, rt.handle().clone()).unwrap();
        w.join();
        assert_eq!(*committed.lock().unwrap(), vec![vec![0, 1, 2], vec![3, 4]]);
        assert_eq!(drain(&sink), [Answer::Ack(7, 2), Answer::Ack(7, 4)]);
    }

    /// What a [`Fake`] store was asked to do and what it committed.
    #[derive(Default)]
    struct FakeState {
        /// Fail this many writes first with an outage.
        outages: u32,
        /// Refuse every write holding a quarantine row.
        refuse_quarantine: bool,
        /// Writes attempted.
        writes: u32,
        /// Seqs of committed readings.
        rows: Vec<u64>,
        /// Committed quarantine rows: (seq, reason code, detail).
        quarantine: Vec<(Option<u64>, &'static str, String)>,
    }

    /// A store that refuses any write holding a reading with
    /// `power_w = 1234.5` (like a database trigger would).
    struct Fake(Arc<Mutex<FakeState>>);

    impl ReadingSink for Fake {
        fn write_batch(&mut self, rows: &[Row], q: &[QuarantineRow]) -> Result<(), StoreError> {
            let mut f = self.0.lock().unwrap();
            f.writes += 1;
            if f.outages > 0 {
                f.outages -= 1;
                return Err(StoreError::Db("connection lost".into()));
            }
            if rows.iter().any(|r| r.reading.power_w == Some(1234.5)) {
                return Err(StoreError::Refused("power_w 1234.5 refused".into()));
            }
            if f.refuse_quarantine && !q.is_empty() {
                return Err(StoreError::Refused("quarantine refused".into()));
            }
            f.rows.extend(rows.iter().map(|r| r.reading.seq));
            f.quarantine
                .extend(q.iter().map(|q| (q.seq, q.reason.code(), q.detail.clone())));
            Ok(())
        }
    }

    /// Runs a writer over `items` (queued before it starts) until the
    /// queue is drained.
    fn run_writer(state: &Arc<Mutex<FakeState>>, items: Vec<Item>, batch_max_rows: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for it in items {
            tx.try_send(it).unwrap();
        }
        drop(tx);
        let cfg = WriterConfig {
            batch_max_rows,
            batch_linger: Duration::from_millis(1),
            batch_run: 2,
        };
        let (_stop_tx, stop_rx) = watch::channel(false);
        let w = Writer::spawn(Fake(state.clone()), rx, cfg, stop_rx, rt.handle().clone()).unwrap();
        w.join();
    }

    fn refused_frame(sink: &Arc<Mailbox>, epoch: u64, seq: u64) -> Item {
        let error = FrameError {
            reason: RejectReason::OutOfRange,
            detail: "power_factor out of range".into(),
            epoch: Some(epoch),
            seq: Some(seq),
        };
        let q = QuarantineRow::refused_frame(Arc::from("d"), 0, &error, Some("{}"));
        Item {
            entry: Entry::Quarantine(Box::new(q)),
            ack: sink.clone(),
        }
    }

    #[test]
    fn quarantine_rows_commit_with_the_readings_and_are_answered_first() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let sink = Arc::new(Mailbox::new(1));
        let items = vec![
            item(&sink, 7, 1),
            refused_frame(&sink, 7, 2),
            item(&sink, 7, 3),
        ];
        run_writer(&state, items, 100);
        let f = state.lock().unwrap();
        assert_eq!(f.writes, 1, "one transaction");
        assert_eq!(f.rows, [1, 3]);
        assert_eq!(f.quarantine.len(), 1);
        assert_eq!(
            drain(&sink),
            [
                Answer::Rejected(7, 2, "out_of_range: power_factor out of range".into()),
                Answer::Ack(7, 3)
            ]
        );
    }

    /// One reading the database refuses in a batch of 10: it alone goes to
    /// quarantine (`store_error`, the database's message), the other nine
    /// commit, the answers are its `rejected` then the ack of the last.
    #[test]
    fn a_row_the_store_refuses_is_isolated_and_quarantined() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let sink = Arc::new(Mailbox::new(1));
        let items = (0..10)
            .map(|seq| {
                let mut it = item(&sink, 7, seq);
                if let Entry::Reading(r) = &mut it.entry {
                    if seq == 4 {
                        r.reading.power_w = Some(1234.5);
                    }
                }
                it
            })
            .collect();
        run_writer(&state, items, 100);
        let f = state.lock().unwrap();
        let mut rows = f.rows.clone();
        rows.sort();
        assert_eq!(rows, [0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(
            f.quarantine,
            [(Some(4), "store_error", "power_w 1234.5 refused".to_string())]
        );
        // 1 whole + halving down to the one row + its quarantine row.
        assert!(f.writes <= 1 + 2 * 4 + 1, "{} writes", f.writes);
        assert_eq!(
            drain(&sink),
            [
                Answer::Rejected(7, 4, "store_error: power_w 1234.5 refused".into()),
                Answer::Ack(7, 9)
            ]
        );
    }

    /// A store outage is retried, never mistaken for refused rows: nothing
    /// goes to quarantine.
    #[test]
    fn an_outage_is_retried_and_quarantines_nothing() {
        let state = Arc::new(Mutex::new(FakeState {
            outages: 3,
            ..Default::default()
        }));
        let sink = Arc::new(Mailbox::new(1));
        run_writer(&state, (0..5).map(|s| item(&sink, 2, s)).collect(), 100);
        let f = state.lock().unwrap();
        assert_eq!((f.writes, f.rows.len()), (4, 5));
        assert!(f.quarantine.is_empty());
        assert_eq!(drain(&sink), [Answer::Ack(2, 4)]);
    }

    /// A refused reading whose quarantine row is refused too is neither
    /// stored nor quarantined: its connection is abandoned (no ack, not
    /// even for readings committed with it), another connection in the
    /// same batch is answered as usual.
    #[test]
    fn a_reading_that_cannot_be_quarantined_abandons_its_connection() {
        let state = Arc::new(Mutex::new(FakeState {
            refuse_quarantine: true,
            ..Default::default()
        }));
        let a = Arc::new(Mailbox::new(1));
        let b = Arc::new(Mailbox::new(2));
        let mut bad = item(&a, 7, 1);
        if let Entry::Reading(r) = &mut bad.entry {
            r.reading.power_w = Some(1234.5);
        }
        let items = vec![
            item(&a, 7, 0),
            item(&b, 3, 0),
            bad,
            item(&a, 7, 2),
            item(&b, 3, 1),
        ];
        run_writer(&state, items, 100);
        let f = state.lock().unwrap();
        let mut rows = f.rows.clone();
        rows.sort();
        assert_eq!(rows, [0, 0, 1, 2]);
        assert!(f.quarantine.is_empty());
        assert_eq!(drain(&a), [Answer::Abandoned]);
        assert_eq!(drain(&b), [Answer::Ack(3, 1)]);
    }
}
