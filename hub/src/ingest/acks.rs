//! The ack mailbox of one device connection: the writer pushes the
//! `(epoch, seq)` of what it committed, the connection's session pops and
//! sends them.

/// Where a committed reading's ack goes: one per device connection.
///
/// A mailbox rather than a channel: it allocates nothing until an ack is
/// queued (an unbounded channel's first block was ~0.5 KB of every idle
/// connection; docs/decisions/hub-idle-connection-memory.md). The writer pushes, the connection's session
/// pops; `notify_one` keeps a wake-up for a session that is not waiting
/// yet, so none is lost.
#[derive(Debug)]
pub struct AckSink {
    /// Connection id, to group a batch's acks by connection.
    pub conn_id: u64,
    /// `(epoch, seq)` in commit order. Unbounded, but bounded in practice
    /// by the writer queue (one entry per batch and epoch at most).
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    ready: tokio::sync::Notify,
}

impl AckSink {
    /// An empty mailbox for connection `conn_id`.
    pub fn new(conn_id: u64) -> Self {
        AckSink {
            conn_id,
            queue: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues an ack (the writer, after the commit).
    pub fn push(&self, ack: (u64, u64)) {
        self.lock().push_back(ack);
        self.ready.notify_one();
    }

    /// The oldest queued ack, if any.
    pub fn try_pop(&self) -> Option<(u64, u64)> {
        self.lock().pop_front()
    }

    /// Waits for the next ack. Cancel-safe: an ack is only taken in the
    /// poll that returns it.
    pub async fn pop(&self) -> (u64, u64) {
        loop {
            if let Some(ack) = self.try_pop() {
                return ack;
            }
            self.ready.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, u64)>> {
        // A push or pop cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_come_out_in_commit_order_and_no_wake_up_is_lost() {
        let sink = AckSink::new(7);
        assert_eq!(sink.try_pop(), None);
        // Pushed before anyone waits: the wake-up is kept for the next pop.
        sink.push((1, 5));
        sink.push((2, 0));
        assert_eq!(sink.pop().await, (1, 5));
        assert_eq!(sink.try_pop(), Some((2, 0)));
        assert_eq!(sink.try_pop(), None);
        // Pushed while a pop waits.
        let sink = std::sync::Arc::new(sink);
        let waiter = tokio::spawn({
            let sink = sink.clone();
            async move { sink.pop().await }
        });
        tokio::task::yield_now().await;
        sink.push((3, 9));
        assert_eq!(waiter.await.unwrap(), (3, 9));
    }
}
