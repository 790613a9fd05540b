//! What the sampler and the link threads report to the supervisor: their
//! heartbeats (for the systemd watchdog), the link state and the readings
//! held for clock sync (for the status line). One [`Health`] is shared by
//! the three threads; every field is a lock-free atomic except the link
//! state, whose mutex is held only to copy it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Link state for the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Before the first attempt.
    Starting,
    /// Streaming.
    Connected,
    /// Waiting to retry, with the reason.
    Retrying(String),
}

/// Readings held by the sampler's clock gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCounts {
    /// Held now, waiting for clock sync.
    pub held: u64,
    /// Dropped because the hold was full.
    pub dropped: u64,
}

/// The shared report (see the module docs).
#[derive(Debug)]
pub struct Health {
    /// Reference instant of the heartbeats.
    origin: Instant,
    /// Milliseconds since `origin` of the sampler's last completed tick.
    sampler_beat: AtomicU64,
    /// Milliseconds since `origin` of the link loop's last progress.
    link_beat: AtomicU64,
    /// What the link is doing.
    link: Mutex<LinkState>,
    /// Readings currently held for clock sync.
    held: AtomicU64,
    /// Held readings dropped because the hold was full.
    held_dropped: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// A report in which both threads beat now and the link is starting.
    pub fn new() -> Self {
        Health {
            origin: Instant::now(),
            sampler_beat: AtomicU64::new(0),
            link_beat: AtomicU64::new(0),
            link: Mutex::new(LinkState::Starting),
            held: AtomicU64::new(0),
            held_dropped: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn since(&self, beat: &AtomicU64) -> Duration {
        let at = Duration::from_millis(beat.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(at)
    }

    /// The sampler completed a tick.
    pub fn sampler_beat(&self) {
        self.sampler_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The link loop made progress.
    pub fn link_beat(&self) {
        self.link_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Both threads beat within their windows: the watchdog may be fed.
    pub fn alive(&self, sampler_window: Duration, link_window: Duration) -> bool {
        self.since(&self.sampler_beat) < sampler_window && self.since(&self.link_beat) < link_window
    }

    /// Records what the link is doing.
    pub fn set_link_state(&self, state: LinkState) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// What the link is doing.
    pub fn link_state(&self) -> LinkState {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the clock gate's hold.
    pub fn set_hold(&self, hold: HoldCounts) {
        self.held.store(hold.held, Ordering::Relaxed);
        self.held_dropped.store(hold.dropped, Ordering::Relaxed);
    }

    /// The clock gate's hold as last recorded.
    pub fn hold(&self) -> HoldCounts {
        HoldCounts {
            held: self.held.load(Ordering::Relaxed),
            dropped: self.held_dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_beating_is_not_alive() {
        let h = Health::new();
        let (window, long) = (Duration::from_millis(500), Duration::from_secs(3600));
        assert!(h.alive(long, long));
        std::thread::sleep(window + Duration::from_millis(100));
        assert!(!h.alive(window, long));
        assert!(!h.alive(long, window));
        h.sampler_beat();
        assert!(h.alive(window, long));
        assert!(!h.alive(window, window));
        h.link_beat();
        assert!(h.alive(window, window));
    }

    #[test]
    fn link_state_and_hold_are_reported() {
        let h = Health::new();
        assert_eq!(h.link_state(), LinkState::Starting);
        h.set_link_state(LinkState::Retrying("down".into()));
        assert_eq!(h.link_state(), LinkState::Retrying("down".into()));
        h.set_hold(HoldCounts {
            held: 3,
            dropped: 1,
        });
        assert_eq!(
            h.hold(),
            HoldCounts {
                held: 3,
                dropped: 1
            }
        );
    }
}
