//! The mailbox of one live device connection: everything the rest of the
//! hub tells the connection's session arrives here, and the session takes
//! it out in one wait.
//!
//! - The store writer pushes what it committed: acks for stored readings,
//!   `rejected` for quarantined ones, and, when it gave up on a reading,
//!   that the connection must close ([`Answer`]).
//! - The registry asks the connection to close ([`Kick`]): replaced by a
//!   newer connection, token revoked, takeover loop.
//! - The hub's shutdown, and the heartbeat's tick ([`Mailbox::tick`]).
//!
//! One mailbox instead of a channel, a timer and a shutdown watch per
//! connection: an idle connection's task waits on one future, and the
//! mailbox allocates nothing until an answer is queued. Idle device
//! connections are the hub's memory budget
//! (docs/decisions/hub-idle-connection-memory.md).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

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

/// Why the hub asks a device connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A newer connection of the same device took over (close code 4000).
    Replaced,
    /// The device's token was revoked or rotated (close code 4001).
    Revoked,
    /// The device id is in a takeover loop (close code 4002).
    Conflict,
}

impl Kick {
    /// The WebSocket close code and reason for this kick.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Kick::Replaced => (ems_shared::CLOSE_REPLACED, "replaced"),
            Kick::Revoked => (ems_shared::CLOSE_REVOKED, "token revoked"),
            Kick::Conflict => (ems_shared::CLOSE_CONFLICT, "conflict"),
        }
    }
}

/// One piece of mail, in the order the session must see them: a kick
/// before the shutdown, both before answers, answers before the heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mail {
    /// Close the connection with this kick's code.
    Kick(Kick),
    /// The hub is shutting down (sticky: every later wait returns it too).
    ShuttingDown,
    /// The writer's next answer.
    Answer(Answer),
    /// One heartbeat period has passed.
    Tick,
}

/// The mailbox of one device connection.
///
/// The writer, the registry, the shutdown and the heartbeat push; the
/// connection's session, its only reader, waits in [`Mailbox::next`]. The
/// reader's waker is kept under the same lock as the mail: a push either
/// finds it and wakes it, or happens before the reader looks, so no
/// wake-up is lost. One waker slot rather than a `Notify`'s list of
/// waiters keeps both the mailbox and the reader's wait small.
#[derive(Debug)]
pub struct Mailbox {
    /// Connection id, to group a batch's acks by connection.
    pub conn_id: u64,
    /// Answers in commit order, and the flags.
    /// Unbounded, but bounded in practice by the writer queue (one ack per
    /// batch and epoch, one `rejected` per quarantined reading).
    inner: std::sync::Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Answer>,
    abandoned: bool,
    /// The first kick, until the session takes it.
    kick: Option<Kick>,
    shutting_down: bool,
    /// A heartbeat tick not taken yet (ticks do not add up).
    tick: bool,
    /// How long the writer may hold this connection's readings before it
    /// answers them, in milliseconds, when the device announced an ack
    /// window (`u32::MAX`: it did not). Never changes; kept under the lock
    /// because it fits in `Inner`'s padding there, where beside `conn_id`
    /// it would take the mailbox's allocation to the next size class.
    hold_ms: u32,
    /// The reader's waker while it waits for mail.
    reader: Option<Waker>,
}

impl Inner {
    /// The waiting reader, to be woken once the lock is released.
    fn wake(&mut self) -> Option<Waker> {
        self.reader.take()
    }
}

impl Mailbox {
    /// An empty mailbox for connection `conn_id`, whose device announced
    /// no ack window.
    pub fn new(conn_id: u64) -> Self {
        Mailbox::with_hold(conn_id, None)
    }

    /// An empty mailbox for connection `conn_id`, whose readings the
    /// writer may hold for `hold` before it answers them.
    pub fn with_hold(conn_id: u64, hold: Option<Duration>) -> Self {
        let hold_ms = hold.map_or(u32::MAX, |h| {
            u32::try_from(h.as_millis()).unwrap_or(u32::MAX - 1)
        });
        Mailbox {
            conn_id,
            inner: std::sync::Mutex::new(Inner {
                queue: VecDeque::new(),
                abandoned: false,
                kick: None,
                shutting_down: false,
                tick: false,
                hold_ms,
                reader: None,
            }),
        }
    }

    /// How long the writer may hold this connection's readings before it
    /// answers them (`None`: the writer's own run length and linger).
    pub fn hold(&self) -> Option<Duration> {
        let ms = self.lock().hold_ms;
        (ms != u32::MAX).then(|| Duration::from_millis(ms.into()))
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
            let reader = inner.wake();
            drop(inner);
            wake(reader);
        }
    }

    /// Whether the connection was abandoned.
    pub fn is_abandoned(&self) -> bool {
        self.lock().abandoned
    }

    /// Asks the connection to close for `reason`. Only the first kick
    /// counts: returns whether this one did.
    pub fn kick(&self, reason: Kick) -> bool {
        let mut inner = self.lock();
        if inner.kick.is_some() {
            return false;
        }
        inner.kick = Some(reason);
        let reader = inner.wake();
        drop(inner);
        wake(reader);
        true
    }

    /// Tells the connection that the hub is shutting down.
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        let reader = inner.wake();
        drop(inner);
        wake(reader);
    }

    /// A heartbeat period has passed for this connection.
    pub fn tick(&self) {
        let mut inner = self.lock();
        inner.tick = true;
        let reader = inner.wake();
        drop(inner);
        wake(reader);
    }

    fn queue(&self, answer: Answer) {
        let mut inner = self.lock();
        if inner.abandoned {
            return;
        }
        inner.queue.push_back(answer);
        let reader = inner.wake();
        drop(inner);
        wake(reader);
    }

    /// The oldest queued answer, if any.
    pub fn try_pop(&self) -> Option<Answer> {
        self.lock().queue.pop_front()
    }

    /// Waits for the next answer, whatever else arrives meanwhile.
    /// Cancel-safe: an answer is only taken in the poll that returns it.
    pub fn pop(&self) -> impl Future<Output = Answer> + '_ {
        poll_fn(move |cx| self.poll_with(cx, |inner| inner.queue.pop_front()))
    }

    /// The next piece of mail, if any.
    pub fn try_next(&self) -> Option<Mail> {
        next_mail(&mut self.lock())
    }

    /// Waits for the next piece of mail. Cancel-safe: mail is only taken
    /// in the poll that returns it.
    ///
    /// A `poll_fn` of one pointer: every idle device connection's task
    /// holds this future.
    pub fn next(&self) -> impl Future<Output = Mail> + '_ {
        poll_fn(move |cx| self.poll_next(cx))
    }

    /// The next piece of mail, or `Pending` with the reader's waker kept
    /// for the next push.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Mail> {
        self.poll_with(cx, next_mail)
    }

    /// What `take` finds, or `Pending` with the waker kept; one lock for
    /// both, so a push in between cannot be missed.
    fn poll_with<T>(
        &self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&mut Inner) -> Option<T>,
    ) -> Poll<T> {
        let mut inner = self.lock();
        if let Some(t) = take(&mut inner) {
            return Poll::Ready(t);
        }
        match &mut inner.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A push or pop cannot leave the mailbox inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Mail in the order the session must see it.
fn next_mail(inner: &mut Inner) -> Option<Mail> {
    if let Some(k) = inner.kick.take() {
        return Some(Mail::Kick(k));
    }
    if inner.shutting_down {
        return Some(Mail::ShuttingDown);
    }
    if let Some(a) = inner.queue.pop_front() {
        return Some(Mail::Answer(a));
    }
    std::mem::take(&mut inner.tick).then_some(Mail::Tick)
}

/// Wakes the reader taken from [`Inner`], outside the lock.
fn wake(reader: Option<Waker>) {
    if let Some(w) = reader {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_come_out_in_commit_order_and_no_wake_up_is_lost() {
        let sink = Mailbox::new(7);
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
        let sink = Mailbox::new(1);
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

    #[tokio::test]
    async fn a_kick_comes_first_and_only_once_then_the_shutdown_then_answers_then_the_tick() {
        let mb = Mailbox::new(3);
        assert_eq!(mb.try_next(), None);
        mb.tick();
        mb.tick();
        mb.push((1, 1));
        assert_eq!(mb.try_next(), Some(Mail::Answer(Answer::Ack(1, 1))));
        assert_eq!(mb.next().await, Mail::Tick, "ticks do not add up");
        assert_eq!(mb.try_next(), None);
        mb.push((1, 2));
        mb.shut_down();
        assert!(mb.kick(Kick::Revoked));
        assert!(!mb.kick(Kick::Replaced), "the first kick counts");
        assert_eq!(mb.next().await, Mail::Kick(Kick::Revoked));
        assert_eq!(mb.try_next(), Some(Mail::ShuttingDown));
        assert_eq!(mb.try_next(), Some(Mail::ShuttingDown), "sticky");
        // At shutdown the session still takes its answers.
        assert_eq!(mb.pop().await, Answer::Ack(1, 2));
    }

    #[tokio::test]
    async fn a_kick_wakes_a_waiting_session() {
        let mb = std::sync::Arc::new(Mailbox::new(1));
        let waiter = tokio::spawn({
            let mb = mb.clone();
            async move { mb.next().await }
        });
        tokio::task::yield_now().await;
        mb.kick(Kick::Conflict);
        assert_eq!(waiter.await.unwrap(), Mail::Kick(Kick::Conflict));
    }

    #[test]
    fn every_kind_of_mail_wakes_the_waiting_reader() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        type Push = fn(&Mailbox);
        let pushes: [(&str, Push); 6] = [
            ("ack", |m| m.push((1, 1))),
            ("rejected", |m| m.push_rejected(1, 2, "out_of_range: x")),
            ("abandoned", Mailbox::abandon),
            ("kick", |m| {
                m.kick(Kick::Replaced);
            }),
            ("shutdown", Mailbox::shut_down),
            ("tick", Mailbox::tick),
        ];
        for (what, push) in pushes {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let waker = Waker::from(count.clone());
            let mut cx = Context::from_waker(&waker);
            let mb = Mailbox::new(1);
            assert!(mb.poll_next(&mut cx).is_pending(), "{what}");
            assert!(mb.poll_next(&mut cx).is_pending(), "{what}");
            push(&mb);
            assert_eq!(count.0.load(Ordering::SeqCst), 1, "{what} wakes once");
            assert!(mb.poll_next(&mut cx).is_ready(), "{what}");
            // Mail pushed while nobody waits wakes nobody, and is not lost.
            push(&mb);
            assert_eq!(count.0.load(Ordering::SeqCst), 1, "{what}");
        }
    }

    #[test]
    fn a_mailbox_keeps_its_connections_hold() {
        use std::time::Duration;
        assert_eq!(Mailbox::new(1).hold(), None);
        let two = Some(Duration::from_secs(2));
        assert_eq!(Mailbox::with_hold(1, two).hold(), two);
        assert_eq!(
            Mailbox::with_hold(1, Some(Duration::ZERO)).hold(),
            Some(Duration::ZERO)
        );
        // Beyond what u32 milliseconds hold: the longest that is not "none".
        let far = Mailbox::with_hold(1, Some(Duration::from_secs(10_000_000))).hold();
        assert_eq!(far, Some(Duration::from_millis(u64::from(u32::MAX - 1))));
    }
}
