//! The cold path: a background thread that owns a store handle, takes
//! readings from a bounded queue, commits them in batches and then sends
//! the acks.
//!
//! - Batches close when `batch_max_rows` are queued or `batch_linger` has
//!   passed since the first reading of the batch.
//! - A failed commit is retried with backoff until it succeeds; acks are
//!   withheld meanwhile, the queue fills, and device sessions stop reading
//!   their sockets (backpressure) — nothing is dropped.
//! - Acks are sent only after the commit returned: per connection and
//!   epoch, the seq of the last reading of that epoch in the batch, in
//!   arrival order (see the ack semantics in `ems-shared`).
//! - The thread exits once every queue sender is dropped and the queue is
//!   drained, so a graceful shutdown flushes everything it received.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use super::acks::AckSink;
use crate::metrics::Metrics;
use crate::shutdown::shutting_down;
use crate::store::{ReadingSink, Row};

/// One queued reading.
#[derive(Debug)]
pub struct Item {
    /// What to store.
    pub row: Row,
    /// Who to ack.
    pub ack: Arc<AckSink>,
}

/// Batching parameters.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most rows per transaction.
    pub batch_max_rows: usize,
    /// Longest wait for a batch to fill.
    pub batch_linger: Duration,
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
        Self::spawn_with_metrics(store, rx, cfg, stop, rt, Arc::new(Metrics::new()))
    }

    /// Like [`Writer::spawn`], recording batch sizes, commit latency,
    /// failures, store health and the queue depth in `metrics`.
    pub fn spawn_with_metrics(
        store: impl ReadingSink + 'static,
        rx: mpsc::Receiver<Item>,
        cfg: WriterConfig,
        stop: watch::Receiver<bool>,
        rt: Handle,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Writer> {
        let join = std::thread::Builder::new()
            .name("ems-writer".into())
            .spawn(move || run(store, rx, cfg, stop, rt, &metrics))?;
        Ok(Writer { join })
    }

    /// Waits for the thread to finish (blocking).
    pub fn join(self) {
        if self.join.join().is_err() {
            log::error!("store writer thread panicked");
        }
    }
}

fn run(
    mut store: impl ReadingSink,
    mut rx: mpsc::Receiver<Item>,
    cfg: WriterConfig,
    mut stop: watch::Receiver<bool>,
    rt: Handle,
    metrics: &Metrics,
) {
    lower_priority();
    let max = cfg.batch_max_rows.max(1);
    // The rows and, side by side, who to ack for each (no copy of a row).
    // (They grow to the largest batch seen, not to `max` up front.)
    let mut rows: Vec<Row> = Vec::with_capacity(max.min(1024));
    let mut acks: Vec<Arc<AckSink>> = Vec::with_capacity(max.min(1024));
    // Set once the hub is stopping and the store keeps failing (see `commit`).
    let mut give_up_at: Option<Instant> = None;
    loop {
        // Wait for the first reading of the next batch.
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
        rows.push(first.row);
        acks.push(first.ack);
        let deadline = Instant::now() + cfg.batch_linger;
        while rows.len() < max {
            match rx.try_recv() {
                Ok(item) => {
                    rows.push(item.row);
                    acks.push(item.ack);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    // Sleep out the linger, then take what queued up, instead
                    // of a wake-up per reading: about a fifth less writer CPU
                    // (docs/decisions/hub-store-writer-thread.md).
                    std::thread::sleep(deadline - now);
                }
            }
        }
        if commit(&mut store, &rows, metrics, &stop, &mut give_up_at) {
            send_acks(&rows, &acks);
        }
        rows.clear();
        acks.clear();
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

/// Commits `rows`, retrying with capped exponential backoff until the
/// store accepts them. Dedup on (device_id, epoch, seq) makes a retry after
/// an ambiguous failure safe. Returns `false` only when the hub is shutting
/// down and the store stayed unreachable for [`SHUTDOWN_RETRY`]: the rows
/// are then not acked, so the edges still hold them and resend them to the
/// next hub — the process can exit in bounded time without losing anything.
fn commit(
    store: &mut dyn ReadingSink,
    rows: &[Row],
    metrics: &Metrics,
    stop: &watch::Receiver<bool>,
    give_up_at: &mut Option<Instant>,
) -> bool {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    let started = Instant::now();
    loop {
        match store.insert_batch(rows) {
            Ok(()) => {
                metrics.committed(rows.len(), started.elapsed());
                if attempt > 0 {
                    log::info!(
                        "store writer: batch of {} committed after {attempt} retries",
                        rows.len()
                    );
                }
                return true;
            }
            Err(e) => {
                if *stop.borrow() {
                    // One deadline for the whole shutdown, not per batch.
                    let deadline =
                        *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_RETRY);
                    if Instant::now() >= deadline {
                        log::error!(
                            "store writer: giving up on {} unacknowledged readings at shutdown ({e}); \
                             the devices keep them and resend them",
                            rows.len()
                        );
                        return false;
                    }
                }
                attempt += 1;
                metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                metrics.store_writer_ok.store(0, Ordering::Relaxed);
                if attempt == 1 || attempt.is_power_of_two() {
                    log::error!(
                        "store writer: commit of {} readings failed (attempt {attempt}), retrying: {e}",
                        rows.len()
                    );
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn send_acks(rows: &[Row], sinks: &[Arc<AckSink>]) {
    // (conn_id, epoch) -> (sink, last seq in arrival order)
    let mut acks: HashMap<(u64, u64), (&Arc<AckSink>, u64)> = HashMap::with_capacity(rows.len());
    for (row, sink) in rows.iter().zip(sinks) {
        let key = (sink.conn_id, row.reading.epoch);
        acks.insert(key, (sink, row.reading.seq));
    }
    for ((_, epoch), (sink, seq)) in acks {
        // The connection may have closed meanwhile; its readings are
        // stored and the mailbox goes with the last reference.
        sink.push((epoch, seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use ems_shared::Reading;
    use std::sync::Mutex;

    /// A store that records committed seqs and fails the first `fail` commits.
    struct Recording {
        committed: Arc<Mutex<Vec<Vec<u64>>>>,
        fail: u32,
    }

    impl ReadingSink for Recording {
        fn insert_batch(&mut self, rows: &[Row]) -> Result<(), StoreError> {
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

    fn item(sink: &Arc<AckSink>, epoch: u64, seq: u64) -> Item {
        Item {
            row: Row {
                device_id: Arc::from("d"),
                received_at_ms: 0,
                reading: Reading {
                    epoch,
                    seq,
                    meter: "m".into(),
                    power_w: Some(1.0),
                    ..Default::default()
                },
            },
            ack: sink.clone(),
        }
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
        let sink = Arc::new(AckSink::new(1));
        for seq in 0..3 {
            tx.try_send(item(&sink, 1, seq)).unwrap();
        }
        let cfg = WriterConfig {
            batch_max_rows: 1,
            batch_linger: Duration::from_millis(1),
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
        assert!(sink.try_pop().is_none(), "nothing may be acked");
        drop(tx);
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
        let sink = Arc::new(AckSink::new(1));
        // Queue everything first so it forms one batch of 3 (max 3).
        for seq in 0..5 {
            tx.try_send(item(&sink, 7, seq)).unwrap();
        }
        drop(tx);
        let cfg = WriterConfig {
            batch_max_rows: 3,
            batch_linger: Duration::from_millis(1),
        };
        let (_stop_tx, stop_rx) = watch::channel(false);
        let w = Writer::spawn(store, rx, cfg, stop_rx, rt.handle().clone()).unwrap();
        w.join();
        assert_eq!(*committed.lock().unwrap(), vec![vec![0, 1, 2], vec![3, 4]]);
        assert_eq!(sink.try_pop(), Some((7, 2)));
        assert_eq!(sink.try_pop(), Some((7, 4)));
        assert!(sink.try_pop().is_none());
    }
}
