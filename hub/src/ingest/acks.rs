//! The answer mailbox of one device connection: the writer pushes what it
//! committed — acks for stored readings, `rejected` for quarantined ones —
//! and, when it gave up on a reading, that the connection must close; the
//! connection's session pops and sends them, in that order.

use std::collections::VecDeque;

/// What the writer has to tell a device about its readings, after the
/// commit that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Cumulative ack: `(epoch, seq)` and every earlier reading of `epoch`
    /// on this connection are stored (or quarantined and answered before).
    Ack(u64, u64),
    /// `(epoch, seq)` is in quarantine: answer `rejected` with `reason`
    /// (`"code: detail"`).
    Rejected(u64, u64, Box<str>),
    /// A reading of this connection was neither stored nor quarantined:
    /// no ack may follow (it would cover the reading), so the session
    /// closes the connection and the edge sends everything unacked again.
    /// The last answer a mailbox gives.
    Abandoned,
}

/// Where a committed reading's answer goes: one per device connection.
///
/// A mailbox rather than a channel: it allocates nothing until an answer
/// is queued (an unbounded channel's first block was ~0.5 KB of every idle
/// connection; docs/decisions/hub-idle-connection-memory.md). The writer
/// pushes, the connection's session pops; `notify_one` keeps a wake-up for
/// a session that is not waiting yet, so none is lost.
#[derive(Debug)]
pub struct AckSink {
    /// Connection id, to group a batch's acks by connection.
    pub conn_id: u64,
    /// Answers in commit order, and whether the connection was abandoned.
    /// Unbounded, but bounded in practice by the writer queue (one ack per
    /// batch and epoch, one `rejected` per quarantined reading).
    inner: std::sync::Mutex<Inner>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Answer>,
    abandoned: bool,
}

impl AckSink {
    /// An empty mailbox for connection `conn_id`.
    pub fn new(conn_id: u64) -> Self {
        AckSink {
            conn_id,
            inner: std::sync::Mutex::new(Inner::default()),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues an ack (the writer, after the commit). Ignored once the
    /// connection was abandoned.
    pub fn push(&self, (epoch, seq): (u64, u64)) {
        self.queue(Answer::Ack(epoch, seq));
    }

    /// Queues a `rejected` answer for a reading committed to quarantine.
    /// Ignored once the connection was abandoned.
    pub fn push_rejected(&self, epoch: u64, seq: u64, reason: &str) {
        self.queue(Answer::Rejected(epoch, seq, reason.into()));
    }

    /// A reading of this connection was neither stored nor quarantined:
    /// nothing more is queued for it, [`Answer::Abandoned`] is its last
    /// answer.
    pub fn abandon(&self) {
        let mut inner = self.lock();
        if !inner.abandoned {
            inner.abandoned = true;
            inner.queue.push_back(Answer::Abandoned);
            drop(inner);
            self.ready.notify_one();
        }
    }

    /// Whether the connection was abandoned.
    pub fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    fn queue(&self, answer: Answer) {
        let mut inner = self.lock();
        if inner.abandoned {
            return;
        }
        inner.queue.push_back(answer);
        drop(inner);
        self.ready.notify_one();
    }

    /// The oldest queued answer, if any.
    pub fn try_pop(&self) -> Option<Answer> {
        self.lock().queue.pop_front()
    }

    /// Waits for the next answer. Cancel-safe: an answer is only taken in
    /// the poll that returns it.
    pub async fn pop(&self) -> Answer {
        loop {
            if let Some(a) = self.try_pop() {
                return a;
            }
            self.ready.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A push or pop cannot leave the queue inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        assert_eq!(sink.pop().await, Answer::Ack(1, 5));
        assert_eq!(sink.try_pop(), Some(Answer::Ack(2, 0)));
        assert_eq!(sink.try_pop(), None);
        // Pushed while a pop waits.
        let sink = std::sync::Arc::new(sink);
        let waiter = tokio::spawn({
            let sink = sink.clone();
            async move { sink.pop().await }
        });
        tokio::task::yield_now().await;
        sink.push((3, 9));
        assert_eq!(waiter.await.unwrap(), Answer::Ack(3, 9));
    }

    #[tokio::test]
    async fn nothing_follows_an_abandoned_connection() {
        let sink = AckSink::new(1);
        sink.push_rejected(4, 2, "out_of_range: x");
        sink.push((4, 1));
        sink.abandon();
        sink.abandon();
        sink.push((4, 9));
        sink.push_rejected(4, 10, "out_of_range: y");
        assert!(sink.is_abandoned());
        assert_eq!(
            sink.try_pop(),
            Some(Answer::Rejected(4, 2, "out_of_range: x".into()))
        );
        assert_eq!(sink.try_pop(), Some(Answer::Ack(4, 1)));
        assert_eq!(sink.pop().await, Answer::Abandoned);
        assert_eq!(sink.try_pop(), None);
    }
}
