//! One thread at low CPU priority for the API's long computations: the
//! device lists (gathering what this hub knows of thousands of devices,
//! merging it with the stored state, the JSON text: milliseconds at
//! 10,000 devices) and the CSV encoding of export pages. Work here takes
//! a lock that ingest also takes only for a short hold at a time
//! ([`crate::config::LOCK_CHUNK`] devices): a holder preempted in favour
//! of ingest stalls ingest behind it, so a hold must not span the whole
//! fleet.
//!
//! On the async workers such work would hold back every device session
//! of that worker; on tokio's blocking pool it still competes as an equal
//! with the workers and the store writer for the CPU — on a hub pinned to
//! one core, a listing every half second doubled the ingest acks' p99.
//! This thread runs at `nice` +10 (Linux keeps a nice value per thread),
//! so the scheduler gives ingest and fan-out the CPU first and the API's
//! work the rest. Jobs run one at a time, in the order they came.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

/// The thread's niceness: CFS weight 110 against 1,024 for the rest of
/// the hub, about a tenth of a contended core.
const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// The queue to the thread, started on first use.
static QUEUE: OnceLock<Mutex<Option<mpsc::Sender<Job>>>> = OnceLock::new();

/// Why a job gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackgroundError {
    /// The thread could not be started.
    #[error("cannot start the background thread: {0}")]
    Start(String),
    /// The job panicked (a bug); the thread goes on with the next job.
    #[error("background job panicked")]
    Panicked,
}

/// Runs `f` on the background thread and waits for its answer.
pub(crate) async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackgroundError> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        if let Ok(v) = catch_unwind(AssertUnwindSafe(f)) {
            let _ = tx.send(v);
        }
    });
    submit(job)?;
    rx.await.map_err(|_| BackgroundError::Panicked)
}

fn submit(job: Job) -> Result<(), BackgroundError> {
    let queue = QUEUE.get_or_init(|| Mutex::new(None));
    let mut queue = queue.lock().unwrap_or_else(|p| p.into_inner());
    let job = match queue.as_ref() {
        Some(tx) => match tx.send(job) {
            Ok(()) => return Ok(()),
            // The thread is gone (it cannot end by itself): start another.
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ems-background".into())
        .spawn(move || {
            lower_priority();
            for job in rx {
                job();
            }
        })
        .map_err(|e| BackgroundError::Start(e.to_string()))?;
    let sent = tx.send(job).is_ok();
    *queue = Some(tx);
    if sent {
        Ok(())
    } else {
        Err(BackgroundError::Start(
            "the new thread ended at once".into(),
        ))
    }
}

/// Lowers the calling thread's priority (Linux: per thread). A failure
/// leaves it at the normal priority, which is only slower for ingest.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's own id.
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE)
        };
        if rc != 0 {
            log::debug!(
                "background thread: cannot lower its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_answer_in_order_and_a_panic_does_not_stop_the_thread() {
        assert_eq!(run(|| 2 + 2).await.unwrap(), 4);
        let panicked = run(|| -> u8 { panic!("a bug") }).await;
        assert!(matches!(panicked, Err(BackgroundError::Panicked)));
        let name = run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("ems-background"));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_thread_runs_at_a_lower_priority() {
        let nice = run(|| {
            // SAFETY: reads the calling thread's own niceness.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        })
        .await
        .unwrap();
        assert!(nice >= NICE, "nice {nice}");
    }
}
