//! A shutdown signal shared by the edge's threads: set once (by SIGTERM,
//! SIGINT or a test), observed by polling or by an interruptible wait.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Cloneable handle; all clones see the same flag.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// The flag and the condvar that wakes waiters when it is set.
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Shutdown {
    /// A fresh, untriggered signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes every waiter.
    pub fn trigger(&self) {
        let (lock, cv) = &*self.inner;
        let mut flag = lock.lock().unwrap_or_else(|p| p.into_inner());
        *flag = true;
        cv.notify_all();
    }

    /// Has shutdown been requested?
    pub fn is_triggered(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until `deadline` or shutdown; returns true on shutdown.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let (lock, cv) = &*self.inner;
        let mut flag = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *flag {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            flag = match cv.wait_timeout(flag, deadline - now) {
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
}
