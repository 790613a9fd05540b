//! The outbox as the sampler, the link and the supervisor share it
//! ([`SharedOutbox`]), and the supervisor's doorbell ([`SyncBell`]).
//!
//! After an append that made a reading sendable, the sampler first tries
//! to put it on the wire itself (the `send` of [`SharedOutbox::append_all`],
//! the link's [`Conduit::try_send`](crate::link::Conduit::try_send), run
//! with the outbox unlocked: the conduit's lock comes before the
//! outbox's); only if that leaves something to the link is the link's
//! [`Wake`] signalled. A sync that released readings always signals it.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use ems_shared::Reading;

use super::{Outbox, SyncDone, SyncJob};
use crate::wake::Wake;

/// A doorbell the supervisor sleeps on between syncs: rung when a reading
/// waits for a ceiling raise or a ceiling needs one (sync now) and at
/// shutdown; nudged when a reading falls due before the supervisor's
/// planned wake-up (plan again).
#[derive(Debug, Default)]
pub struct SyncBell {
    /// `(rung, nudged)` since the last wait.
    state: Mutex<(bool, bool)>,
    /// Wakes the waiter.
    cv: Condvar,
}

impl SyncBell {
    /// Rings: sync now.
    pub fn ring(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = true;
        self.cv.notify_all();
    }

    /// Nudges: wake up and plan again.
    pub fn nudge(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        self.cv.notify_all();
    }

    /// Sleeps until rung, nudged or `deadline`; returns whether it was rung
    /// (and resets both).
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.0 || st.1 {
                let rung = st.0;
                *st = (false, false);
                return rung;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.cv.wait_timeout(st, deadline - now) {
                Ok((r, _)) => r,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// The [`Outbox`] as the sampler, the link and the supervisor share it,
/// with the two ways to wake them: the link's [`Wake`] (a reading may go
/// out) and the supervisor's [`SyncBell`] (a reading waits for a sync).
///
/// A panic while the lock is held (a bug) must not stop the other threads:
/// every method of [`Outbox`] leaves it consistent between calls, so a
/// poisoned lock is taken over as it is.
#[derive(Debug, Clone)]
pub struct SharedOutbox {
    /// The outbox.
    inner: Arc<Mutex<Outbox>>,
    /// Signalled when a reading can go out while connected and the
    /// sampler did not send it.
    wake: Arc<Wake>,
    /// Rung when a sync is wanted now.
    bell: Arc<SyncBell>,
}

impl SharedOutbox {
    /// Shares `outbox`; fails only if no eventfd can be had.
    pub fn new(outbox: Outbox) -> io::Result<Self> {
        Ok(SharedOutbox {
            inner: Arc::new(Mutex::new(outbox)),
            wake: Arc::new(Wake::new()?),
            bell: Arc::new(SyncBell::default()),
        })
    }

    /// Locks the outbox. Nobody holds the lock across network or disk
    /// waits, so this never blocks for long.
    pub fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link's wake-up descriptor.
    pub fn wake(&self) -> &Arc<Wake> {
        &self.wake
    }

    /// The supervisor's doorbell.
    pub fn bell(&self) -> &Arc<SyncBell> {
        &self.bell
    }

    /// Appends readings (the sampler). If one of them can go out, calls
    /// `send` (with the outbox unlocked): it may put them on the wire on
    /// the caller's thread and returns whether the link has nothing left
    /// to do about them; if not, the link is woken. Then rings the
    /// supervisor if a reading waits for a ceiling raise (or a ceiling
    /// needs one), and nudges it if a reading falls due before its planned
    /// wake-up. Returns the readings the bounds dropped.
    pub fn append_all<'r>(
        &self,
        readings: impl IntoIterator<Item = &'r Reading>,
        send: impl FnOnce(&SharedOutbox) -> bool,
    ) -> u64 {
        let (lost, wake, bell, nudge) = {
            let mut ob = self.lock();
            let first_new = ob.next_rec();
            let lost = readings.into_iter().map(|r| ob.append(r)).sum();
            let nudge = ob.take_plan_again(first_new);
            (lost, ob.take_wake_link(), ob.take_sync_wanted(), nudge)
        };
        if wake && !send(self) {
            self.wake.notify();
        }
        if bell {
            self.bell.ring();
        } else if nudge {
            self.bell.nudge();
        }
        lost
    }

    /// Writes the readings not yet acknowledged under the lock (a fast
    /// `write`) and prepares a ceiling raise, then fsyncs outside it, so
    /// the sampler and the link never wait for the card; readings that
    /// waited for the raise go out after it. Returns what was done (the
    /// spool's error, if any: the readings stay in memory and the next
    /// call retries).
    pub fn sync(&self) -> SyncDone {
        let job = self.lock().begin_sync();
        self.finish(job)
    }

    /// Raises the energy ceilings alone (when rung and no spool sync is
    /// due): prepared under the lock, the ceiling file written and fsynced
    /// outside it, then the readings that waited for the raise go out.
    /// The spool is not touched ([`Outbox::begin_ceiling_sync`]).
    pub fn sync_ceilings(&self) -> SyncDone {
        let job = self.lock().begin_ceiling_sync();
        self.finish(job)
    }

    /// Runs `job` outside the lock, then ends the sync under it and wakes
    /// the link if readings were released.
    fn finish(&self, job: SyncJob) -> SyncDone {
        let done = job.run();
        let wake = {
            let mut ob = self.lock();
            ob.end_sync(&job, &done);
            ob.take_wake_link()
        };
        if wake {
            self.wake.notify();
        }
        done
    }

    /// At an orderly stop, after the sampler and the link stopped: saves
    /// the exact energy counters as the ceilings (see
    /// [`Outbox::begin_stop`]).
    pub fn save_exact_ceilings(&self) -> io::Result<()> {
        let w = self.lock().begin_stop()?;
        w.run()?;
        self.lock().end_stop(&w);
        Ok(())
    }
}
