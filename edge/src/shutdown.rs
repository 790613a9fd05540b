//! A shutdown signal shared by the edge's threads: set once (by SIGTERM,
//! SIGINT or a test), observed by polling, by an interruptible wait, or by
//! a callback for a thread that sleeps on something else (the link in
//! `poll(2)`, the supervisor on its sync bell).

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A callback run when the signal is set.
type Observer = Box<dyn Fn() + Send + Sync>;

/// The shared part.
#[derive(Default)]
struct Inner {
    /// The flag.
    flag: Mutex<bool>,
    /// Wakes waiters when the flag is set.
    cv: Condvar,
    /// Run once when the flag is set (see [`Shutdown::on_trigger`]).
    observers: Mutex<Vec<Observer>>,
}

/// Cloneable handle; all clones see the same flag.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// The flag, its condvar and its observers.
    inner: Arc<Inner>,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A fresh, untriggered signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag, wakes every waiter and runs the observers.
    pub fn trigger(&self) {
        {
            let mut flag = self.inner.flag.lock().unwrap_or_else(|p| p.into_inner());
            *flag = true;
            self.inner.cv.notify_all();
        }
        let observers = self
            .inner
            .observers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for f in observers.iter() {
            f();
        }
    }

    /// Runs `f` when the signal is set (at once if it already is), for a
    /// thread that waits on something other than this signal's condvar.
    /// `f` must be quick, must not call back into this signal, and may run
    /// more than once (a registration racing the trigger).
    pub fn on_trigger(&self, f: impl Fn() + Send + Sync + 'static) {
        let mut observers = self
            .inner
            .observers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        observers.push(Box::new(f));
        if self.is_triggered() {
            if let Some(f) = observers.last() {
                f();
            }
        }
    }

    /// Has shutdown been requested?
    pub fn is_triggered(&self) -> bool {
        *self.inner.flag.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until `deadline` or shutdown; returns true on shutdown.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut flag = self.inner.flag.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *flag {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            flag = match self.inner.cv.wait_timeout(flag, deadline - now) {
                Ok((f, _)) => f,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Sleeps for `d` or until shutdown; returns true on shutdown.
    pub fn wait(&self, d: Duration) -> bool {
        self.wait_until(Instant::now() + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_interrupted_by_trigger() {
        let s = Shutdown::new();
        assert!(!s.wait(Duration::from_millis(10)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        assert!(t.join().unwrap());
        assert!(s.is_triggered());
    }

    #[test]
    fn observers_run_on_trigger_or_at_once_if_late() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let s = Shutdown::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        s.on_trigger(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        s.clone().trigger();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let c = calls.clone();
        s.on_trigger(move || {
            c.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 11);
    }
}
