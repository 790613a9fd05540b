//! The outbox's bookkeeping, pure: no I/O, unit-tested.
//!
//! It works on *record numbers* (a reading's position in the spool, dense and
//! increasing across restarts): which records are done (acked, rejected or
//! dropped), which are in flight on the current connection in send order,
//! what to send next. The sending order and the ack rules are in the
//! [module docs](super).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

pub use crate::spool::DropCause;

/// A reading sent on the current connection and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flight {
    /// Spool record number.
    pub rec: u64,
    /// The reading's epoch.
    pub epoch: u64,
    /// The reading's seq.
    pub seq: u64,
}

/// What an ack or rejection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Readings newly marked done.
    pub done: usize,
    /// The (epoch, seq) was not in flight (duplicate or stale answer).
    pub unknown: bool,
    /// A refused reading cannot be sent again: the spool dropped it while
    /// it was in flight. It is lost, for this reason.
    pub lost: Option<DropCause>,
}

impl AckOutcome {
    /// The answer named nothing in flight.
    const UNKNOWN: AckOutcome = AckOutcome {
        done: 0,
        unknown: true,
        lost: None,
    };
}

/// Pure outbox bookkeeping (see the module docs).
#[derive(Debug, Clone)]
pub struct OutboxState {
    /// Next record number to be appended.
    next_rec: u64,
    /// Every record below this is done.
    low: u64,
    /// Records at or above `low` that are done (acked out of order).
    done: BTreeSet<u64>,
    /// A connection is up (live readings are queued for immediate sending).
    connected: bool,
    /// Backlog scan position: records in `[low, cursor)` are done or in flight.
    cursor: u64,
    /// Records appended while connected and not yet sent, oldest first.
    live: VecDeque<u64>,
    /// Bound of `live`; beyond it the backlog scan picks them up instead.
    live_cap: usize,
    /// In flight on this connection, in send order.
    in_flight: VecDeque<Flight>,
    /// Record numbers of `in_flight`, for the backlog scan.
    in_flight_recs: HashSet<u64>,
    /// Most readings in flight.
    window: usize,
    /// Records below this may be sent (see
    /// [`OutboxState::sendable_below`]).
    sendable: u64,
    /// In flight, but dropped from the spool meanwhile (full): stored if
    /// the hub acks them, lost (for this reason) if the connection ends
    /// first. Counting them only then keeps every count exact.
    orphans: HashMap<u64, DropCause>,
}

impl OutboxState {
    /// State for a spool whose records `[low, next_rec)` are not done.
    pub fn new(low: u64, next_rec: u64, window: usize) -> Self {
        OutboxState {
            next_rec: next_rec.max(low),
            low,
            done: BTreeSet::new(),
            connected: false,
            cursor: low,
            live: VecDeque::new(),
            live_cap: 4096,
            in_flight: VecDeque::new(),
            in_flight_recs: HashSet::new(),
            window: window.max(1),
            orphans: HashMap::new(),
            sendable: next_rec.max(low),
        }
    }

    /// Records below `end` may be sent from now on. The caller releases a
    /// reading at once unless its energy is above its meter's saved
    /// ceiling (see `crate::ceiling`); records recovered from the spool at
    /// start are sendable.
    pub fn sendable_below(&mut self, end: u64) {
        self.sendable = self.sendable.max(end.min(self.next_rec));
    }

    /// Readings not yet done.
    pub fn depth(&self) -> u64 {
        self.next_rec - self.low - self.done.len() as u64
    }

    /// Lowest record not yet done (the spool may delete everything below).
    pub fn low(&self) -> u64 {
        self.low
    }

    /// Next record number.
    pub fn next_rec(&self) -> u64 {
        self.next_rec
    }

    /// A connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Readings in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Is `rec` done?
    pub fn is_done(&self, rec: u64) -> bool {
        rec < self.low || self.done.contains(&rec)
    }

    /// A record was appended with number `rec` (must be `next_rec`).
    pub fn appended(&mut self, rec: u64) {
        debug_assert!(rec >= self.next_rec);
        self.next_rec = rec + 1;
        if self.connected {
            if self.live.len() >= self.live_cap {
                // Still in the spool: the backlog scan will reach it.
                self.live.pop_front();
            }
            self.live.push_back(rec);
        }
    }

    /// A connection is up: everything not done will be (re)sent. Returns
    /// the readings lost with the previous connection (see
    /// [`OutboxState::disconnected`]).
    pub fn connected(&mut self) -> Vec<DropCause> {
        let lost = self.reset_connection();
        self.connected = true;
        lost
    }

    /// The connection is gone: in-flight readings become unsent. Returns
    /// the causes of the in-flight readings that cannot be resent (the
    /// spool dropped them meanwhile): they are lost.
    pub fn disconnected(&mut self) -> Vec<DropCause> {
        let lost = self.reset_connection();
        self.connected = false;
        lost
    }

    fn reset_connection(&mut self) -> Vec<DropCause> {
        self.in_flight.clear();
        self.in_flight_recs.clear();
        self.live.clear();
        self.cursor = self.low;
        self.orphans.drain().map(|(_, cause)| cause).collect()
    }

    /// The record to send next, if the window has room: live first, then the
    /// oldest backlog record. Does not change what counts as sent; call
    /// [`OutboxState::sent`] (or [`OutboxState::discard`]) with it.
    pub fn peek_next(&mut self) -> Option<u64> {
        if !self.connected || self.in_flight.len() >= self.window {
            return None;
        }
        self.waiting()
    }

    /// Whether every reading not done is in flight on a live connection:
    /// none waits to be sent, for room in the window, for a ceiling raise
    /// or for its turn.
    #[cfg(test)]
    pub fn all_on_the_wire(&mut self) -> bool {
        self.all_on_the_wire_below(self.next_rec)
    }

    /// Whether every reading below `end` that is not done is in flight on
    /// a live connection: none of them waits to be sent, for room in the
    /// window, for a ceiling raise or for its turn.
    pub fn all_on_the_wire_below(&mut self, end: u64) -> bool {
        self.connected
            && self.sendable >= end.min(self.next_rec)
            && self.backlog_next().map_or(true, |rec| rec >= end)
    }

    /// The first sendable record not done and not in flight: live first,
    /// then the oldest backlog record.
    fn waiting(&mut self) -> Option<u64> {
        while let Some(&rec) = self.live.front() {
            if self.is_done(rec) || self.in_flight_recs.contains(&rec) {
                self.live.pop_front();
            } else if rec < self.sendable {
                return Some(rec);
            } else {
                // Not durable yet (nor anything after it): the backlog's turn.
                break;
            }
        }
        self.backlog_next()
    }

    /// The oldest sendable record not done and not in flight. The scan
    /// covers live records too (the cursor only passes records that are
    /// done or in flight), so this is the oldest of all that wait.
    fn backlog_next(&mut self) -> Option<u64> {
        self.cursor = self.cursor.max(self.low);
        let end = self.sendable.min(self.next_rec);
        while self.cursor < end
            && (self.is_done(self.cursor) || self.in_flight_recs.contains(&self.cursor))
        {
            self.cursor += 1;
        }
        (self.cursor < end).then_some(self.cursor)
    }

    /// `rec` (from [`OutboxState::peek_next`]) was sent as `(epoch, seq)`.
    pub fn sent(&mut self, rec: u64, epoch: u64, seq: u64) {
        if self.live.front() == Some(&rec) {
            self.live.pop_front();
        }
        if self.cursor == rec {
            self.cursor += 1;
        }
        if self.in_flight_recs.insert(rec) {
            self.in_flight.push_back(Flight { rec, epoch, seq });
        }
    }

    /// `rec` cannot be sent (unreadable in the spool): it is done.
    pub fn discard(&mut self, rec: u64) {
        if self.live.front() == Some(&rec) {
            self.live.pop_front();
        }
        self.mark_done(rec);
    }

    fn mark_done(&mut self, rec: u64) -> bool {
        if self.is_done(rec) {
            return false;
        }
        self.done.insert(rec);
        while self.done.remove(&self.low) {
            self.low += 1;
        }
        true
    }

    /// Where `(epoch, seq)` is in the in-flight list.
    fn position(&self, epoch: u64, seq: u64) -> Option<usize> {
        self.in_flight
            .iter()
            .position(|f| f.epoch == epoch && f.seq == seq)
    }

    /// Cumulative ack: `(epoch, seq)` and every reading of `epoch` sent
    /// before it on this connection are done.
    pub fn ack(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let Some(pos) = self.position(epoch, seq) else {
            return AckOutcome::UNKNOWN;
        };
        let mut out = AckOutcome::default();
        let mut kept = VecDeque::with_capacity(self.in_flight.len());
        for (i, f) in std::mem::take(&mut self.in_flight).into_iter().enumerate() {
            if i <= pos && f.epoch == epoch {
                self.in_flight_recs.remove(&f.rec);
                if self.mark_done(f.rec) || self.orphans.remove(&f.rec).is_some() {
                    out.done += 1;
                }
            } else {
                kept.push_back(f);
            }
        }
        self.in_flight = kept;
        out
    }

    /// The hub refused `(epoch, seq)` for good: it leaves the outbox.
    pub fn rejected(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let Some(pos) = self.position(epoch, seq) else {
            return AckOutcome::UNKNOWN;
        };
        let mut out = AckOutcome::default();
        if let Some(f) = self.in_flight.remove(pos) {
            self.in_flight_recs.remove(&f.rec);
            if self.mark_done(f.rec) || self.orphans.remove(&f.rec).is_some() {
                out.done = 1;
            }
        }
        out
    }

    /// The hub did not take `(epoch, seq)` for now (`rate_limited`): it
    /// stays in the outbox and is sent again later on this connection.
    pub fn requeue(&mut self, epoch: u64, seq: u64) -> AckOutcome {
        let Some(pos) = self.position(epoch, seq) else {
            return AckOutcome::UNKNOWN;
        };
        let mut out = AckOutcome::default();
        if let Some(f) = self.in_flight.remove(pos) {
            self.in_flight_recs.remove(&f.rec);
            if let Some(cause) = self.orphans.remove(&f.rec) {
                // Its data is gone: it cannot be sent again.
                out.lost = Some(cause);
            } else {
                // Keep the invariant: everything below the cursor is done or in flight.
                self.cursor = self.cursor.min(f.rec);
            }
        }
        out
    }

    /// The spool dropped every record below `end` (`cause`): returns how
    /// many of them are lost now (neither done nor in flight). Those in
    /// flight stay until the hub answers: acked, they were stored; if the
    /// connection ends first, [`OutboxState::disconnected`] reports them
    /// lost.
    pub fn dropped_below(&mut self, end: u64, cause: DropCause) -> u64 {
        if end <= self.low {
            return 0;
        }
        let end = end.min(self.next_rec);
        let already = self.done.range(..end).count() as u64;
        let mut flying = 0;
        for f in &self.in_flight {
            if f.rec >= self.low && f.rec < end && !self.done.contains(&f.rec) {
                self.orphans.insert(f.rec, cause);
                flying += 1;
            }
        }
        let lost = end - self.low - already - flying;
        self.done = self.done.split_off(&end);
        self.low = end;
        while self.done.remove(&self.low) {
            self.low += 1;
        }
        let low = self.low;
        self.live.retain(|r| *r >= low);
        self.cursor = self.cursor.max(low);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State with `n` records appended while disconnected (and synced).
    fn with_backlog(n: u64, window: usize) -> OutboxState {
        let mut s = OutboxState::new(0, 0, window);
        for r in 0..n {
            s.appended(r);
        }
        s.sendable_below(n);
        s
    }

    /// Appends `rec` and syncs it at once.
    fn append_synced(s: &mut OutboxState, rec: u64) {
        s.appended(rec);
        s.sendable_below(rec + 1);
    }

    /// Sends everything allowed; record r is (epoch 1, seq r).
    fn send_all(s: &mut OutboxState) -> Vec<u64> {
        let mut sent = vec![];
        while let Some(r) = s.peek_next() {
            s.sent(r, 1, r);
            sent.push(r);
        }
        sent
    }

    #[test]
    fn nothing_is_sent_while_disconnected() {
        let mut s = with_backlog(3, 10);
        assert_eq!(s.peek_next(), None);
        assert_eq!(s.depth(), 3);
    }

    #[test]
    fn backlog_goes_oldest_first_within_the_window() {
        let mut s = with_backlog(10, 4);
        s.connected();
        assert_eq!(send_all(&mut s), [0, 1, 2, 3]);
        assert_eq!(s.ack(1, 1).done, 2);
        assert_eq!(send_all(&mut s), [4, 5]);
        assert_eq!(s.in_flight(), 4);
        assert_eq!(s.low(), 2);
    }

    #[test]
    fn live_readings_jump_the_backlog() {
        let mut s = with_backlog(100, 8);
        s.connected();
        assert_eq!(send_all(&mut s), (0..8).collect::<Vec<_>>());
        append_synced(&mut s, 100);
        s.ack(1, 3);
        let next = send_all(&mut s);
        assert_eq!(next[0], 100, "live first: {next:?}");
        assert_eq!(&next[1..], [8, 9, 10]);
    }

    #[test]
    fn ack_is_cumulative_by_send_position_and_epoch() {
        let mut s = OutboxState::new(0, 0, 100);
        s.connected();
        for r in 0..6 {
            append_synced(&mut s, r);
        }
        // Send order 0..6, with two epochs interleaved.
        let ids = [(1, 10), (2, 0), (1, 11), (2, 1), (1, 12), (2, 2)];
        for (r, (e, q)) in ids.iter().enumerate() {
            assert_eq!(s.peek_next(), Some(r as u64));
            s.sent(r as u64, *e, *q);
        }
        let out = s.ack(1, 11);
        assert_eq!(out.done, 2);
        assert!(s.is_done(0) && s.is_done(2));
        assert!(!s.is_done(1) && !s.is_done(3));
        assert_eq!(s.low(), 1);
        assert_eq!(s.ack(2, 2).done, 3);
        assert_eq!(s.low(), 4);
        assert_eq!(s.depth(), 1);
    }

    #[test]
    fn stale_or_duplicate_acks_are_harmless() {
        let mut s = with_backlog(3, 10);
        s.connected();
        send_all(&mut s);
        assert!(s.ack(9, 9).unknown);
        assert_eq!(s.ack(1, 2).done, 3);
        assert!(s.ack(1, 2).unknown);
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn rejected_removes_only_that_reading() {
        let mut s = with_backlog(3, 10);
        s.connected();
        send_all(&mut s);
        assert_eq!(s.rejected(1, 1).done, 1);
        assert!(s.is_done(1) && !s.is_done(0));
        assert_eq!(s.depth(), 2);
        // A later cumulative ack that covers it is fine.
        assert_eq!(s.ack(1, 2).done, 2);
        assert_eq!(s.low(), 3);
    }

    #[test]
    fn disconnect_makes_in_flight_unsent_again() {
        let mut s = with_backlog(5, 10);
        s.connected();
        send_all(&mut s);
        s.ack(1, 1);
        s.disconnected();
        assert_eq!(s.in_flight(), 0);
        append_synced(&mut s, 5);
        s.connected();
        assert_eq!(send_all(&mut s), [2, 3, 4, 5]);
    }

    #[test]
    fn out_of_order_done_records_are_skipped_after_reconnect() {
        let mut s = with_backlog(10, 3);
        s.connected();
        send_all(&mut s); // 0 1 2
        append_synced(&mut s, 10); // live
        s.ack(1, 2); // 0..=2 done
        assert_eq!(send_all(&mut s), [10, 3, 4]);
        s.ack(1, 10); // only 10 (first in send order) done
        assert!(s.is_done(10) && !s.is_done(3));
        s.disconnected();
        s.connected();
        assert_eq!(send_all(&mut s), [3, 4, 5]);
        s.ack(1, 5);
        assert_eq!(send_all(&mut s), [6, 7, 8]);
        s.ack(1, 8);
        assert_eq!(send_all(&mut s), [9]);
        s.ack(1, 9);
        assert_eq!(s.depth(), 0);
        assert_eq!(s.low(), 11);
    }

    #[test]
    fn live_overflow_falls_back_to_the_backlog() {
        let mut s = OutboxState::new(0, 0, 1);
        s.live_cap = 2;
        s.connected();
        for r in 0..5 {
            append_synced(&mut s, r);
        }
        let mut order = vec![];
        for _ in 0..5 {
            let r = s.peek_next().unwrap();
            s.sent(r, 1, r);
            order.push(r);
            s.ack(1, r);
        }
        order.sort();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn requeued_readings_are_sent_again_and_not_lost() {
        let mut s = with_backlog(6, 10);
        s.connected();
        assert_eq!(send_all(&mut s), [0, 1, 2, 3, 4, 5]);
        // The hub's bucket ran dry at seq 3: 3, 4 and 5 were not taken.
        for q in 3..6 {
            assert_eq!(s.requeue(1, q), AckOutcome::default());
        }
        assert!(s.requeue(1, 9).unknown);
        assert_eq!(s.ack(1, 2).done, 3);
        assert_eq!(send_all(&mut s), [3, 4, 5]);
        assert_eq!(s.ack(1, 5).done, 3);
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn drops_count_only_unsent_readings() {
        let mut s = with_backlog(10, 10);
        s.connected();
        send_all(&mut s);
        s.ack(1, 1); // 0,1 done
        s.rejected(1, 5);
        s.disconnected();
        s.connected();
        assert_eq!(send_all(&mut s), [2, 3, 4, 6, 7, 8, 9]);
        s.disconnected();
        assert_eq!(s.dropped_below(7, DropCause::Bound), 4); // 2,3,4,6
        assert_eq!(s.low(), 7);
        assert_eq!(s.dropped_below(3, DropCause::Bound), 0);
        s.connected();
        assert_eq!(send_all(&mut s), [7, 8, 9]);
        assert_eq!(s.ack(1, 9).done, 3);
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn readings_dropped_in_flight_count_as_lost_only_if_never_acked() {
        let mut s = with_backlog(10, 10);
        s.connected();
        assert_eq!(send_all(&mut s).len(), 10);
        // The spool drops 0..6 while they are in flight: nothing lost yet.
        assert_eq!(s.dropped_below(6, DropCause::DiskFull), 0);
        assert_eq!(s.depth(), 4);
        // The hub stored 0..=2 (acked), refused 3 for good, and asked for 4
        // again (rate limit): 4 cannot be resent.
        assert_eq!(s.ack(1, 2).done, 3);
        assert_eq!(s.rejected(1, 3).done, 1);
        assert_eq!(s.requeue(1, 4).lost, Some(DropCause::DiskFull));
        // The connection ends before 5 is acked: lost too.
        assert_eq!(s.disconnected(), [DropCause::DiskFull]);
        s.connected();
        assert_eq!(send_all(&mut s), [6, 7, 8, 9]);
        assert_eq!(s.ack(1, 9).done, 4);
        assert_eq!(s.depth(), 0);
    }

    #[test]
    fn discard_skips_an_unreadable_record() {
        let mut s = with_backlog(3, 10);
        s.connected();
        let r = s.peek_next().unwrap();
        s.discard(r);
        assert_eq!(send_all(&mut s), [1, 2]);
        assert_eq!(s.low(), 1);
    }

    #[test]
    fn readings_go_out_only_once_synced() {
        let mut s = with_backlog(3, 10);
        s.connected();
        s.appended(3);
        s.appended(4);
        // 0..3 are durable, 3 and 4 (live) not yet: the backlog goes.
        assert_eq!(send_all(&mut s), [0, 1, 2]);
        s.sendable_below(4);
        assert_eq!(send_all(&mut s), [3]);
        s.appended(5);
        s.sendable_below(6);
        assert_eq!(send_all(&mut s), [4, 5]);
        assert_eq!(s.ack(1, 5).done, 6);
    }

    #[test]
    fn all_on_the_wire_only_while_nothing_waits_to_be_sent() {
        let mut st = OutboxState::new(0, 0, 2);
        st.appended(0);
        st.sendable_below(1);
        // Not connected.
        assert!(!st.all_on_the_wire());
        st.connected();
        assert!(!st.all_on_the_wire());
        st.sent(0, 1, 0);
        assert!(st.all_on_the_wire());
        // A reading held back (not sendable yet).
        st.appended(1);
        assert!(!st.all_on_the_wire());
        st.sendable_below(3);
        st.sent(1, 1, 1);
        assert!(st.all_on_the_wire());
        // The window (2) is full: the next reading waits.
        st.appended(2);
        st.sendable_below(3);
        assert_eq!(st.peek_next(), None);
        assert!(!st.all_on_the_wire());
        st.ack(1, 0);
        st.sent(2, 1, 2);
        assert!(st.all_on_the_wire());
        st.disconnected();
        assert!(!st.all_on_the_wire());
    }

    #[test]
    fn readings_appended_from_a_record_on_can_be_left_out() {
        let mut st = OutboxState::new(0, 0, 8);
        st.connected();
        st.appended(0);
        st.sendable_below(1);
        st.sent(0, 1, 0);
        // Reading 1 is just appended and not sent yet: everything before it
        // is on the wire, everything is not.
        st.appended(1);
        st.sendable_below(2);
        assert!(st.all_on_the_wire_below(1));
        assert!(!st.all_on_the_wire());
        st.sent(1, 1, 1);
        assert!(st.all_on_the_wire());
        // An older reading that waits (sent live first after a reconnect)
        // is seen even when a newer one went out.
        st.disconnected();
        st.connected();
        st.appended(2);
        st.sendable_below(3);
        st.sent(2, 1, 2);
        assert!(!st.all_on_the_wire_below(2));
    }
}
