//! Live-delivery accounting per subscription: which readings a dashboard
//! subscription received, keyed by `(device, epoch, seq)`, and what that
//! means against what the device sent — readings missing (gaps), readings
//! received more than once (duplicates) and readings nobody sent.
//!
//! Counting deliveries alone is not enough: a subscription that misses one
//! reading and receives another twice has as many deliveries as readings
//! sent. Each reading is therefore remembered once, in a bit set per epoch.

use std::collections::{BTreeMap, HashSet};

/// Seqs below this are kept in a bit set (at most 8 MiB per epoch); the
/// generator's seqs start at 0 and stay far below it. Anything above goes
/// to a hash set so a stray seq cannot make the set huge.
const DENSE_SEQS: u64 = 1 << 26;

/// The distinct `(epoch, seq)` keys of one device's readings that one
/// subscription received, and how many arrived again.
#[derive(Debug, Default)]
pub struct SeqTally {
    /// One bit per seq below [`DENSE_SEQS`], per epoch.
    dense: BTreeMap<u64, Vec<u64>>,
    /// `(epoch, seq)` keys with seq ≥ [`DENSE_SEQS`].
    sparse: HashSet<(u64, u64)>,
    /// Distinct keys received.
    distinct: u64,
    /// Deliveries of a key already received.
    duplicates: u64,
    /// Reading frames without a readable epoch or seq.
    malformed: u64,
}

impl SeqTally {
    /// Records one delivered reading; true if its key is new.
    pub fn record(&mut self, epoch: u64, seq: u64) -> bool {
        let new = if seq < DENSE_SEQS {
            let words = self.dense.entry(epoch).or_default();
            let (word, bit) = ((seq / 64) as usize, seq % 64);
            if words.len() <= word {
                words.resize(word + 1, 0);
            }
            let was = words[word] & (1 << bit) != 0;
            words[word] |= 1 << bit;
            !was
        } else {
            self.sparse.insert((epoch, seq))
        };
        if new {
            self.distinct += 1;
        } else {
            self.duplicates += 1;
        }
        new
    }

    /// Records a reading frame whose key could not be read.
    pub fn malformed(&mut self) {
        self.malformed += 1;
    }

    /// Distinct readings received so far.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// This subscription's account against a device that sent seqs
    /// `0..sent` in `epoch`.
    pub fn account(&self, epoch: u64, sent: u64) -> Account {
        let mut expected_seen = 0u64;
        if let Some(words) = self.dense.get(&epoch) {
            let dense_sent = sent.min(DENSE_SEQS);
            let full = (dense_sent / 64) as usize;
            for w in words.iter().take(full) {
                expected_seen += u64::from(w.count_ones());
            }
            let rest = dense_sent % 64;
            if rest > 0 {
                if let Some(w) = words.get(full) {
                    expected_seen += u64::from((w & ((1u64 << rest) - 1)).count_ones());
                }
            }
        }
        expected_seen += self
            .sparse
            .iter()
            .filter(|&&(e, s)| e == epoch && s < sent)
            .count() as u64;
        Account {
            missing: sent - expected_seen.min(sent),
            duplicates: self.duplicates,
            unexpected: self.distinct - expected_seen + self.malformed,
        }
    }
}

/// What one subscription (or a sum of them) got wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Account {
    /// Readings sent but never received (each missing seq once).
    pub missing: u64,
    /// Deliveries of a reading the subscription had already received.
    pub duplicates: u64,
    /// Readings received that were never sent (another epoch, a seq past
    /// the last one sent) or whose key could not be read.
    pub unexpected: u64,
}

/// The run's live accounting: sums over the subscriptions and how many
/// subscriptions had each kind of fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveAccount {
    /// Subscriptions whose missing readings count (not stalled on purpose).
    pub checked: usize,
    /// Sum of every subscription's account. `missing` counts only the
    /// checked subscriptions: a stalled one misses readings by design, but
    /// it must still never receive one twice or one nobody sent.
    pub total: Account,
    /// Checked subscriptions with at least one missing reading.
    pub subs_with_gaps: usize,
    /// Subscriptions with at least one duplicate.
    pub subs_with_duplicates: usize,
    /// Subscriptions with at least one unexpected reading.
    pub subs_with_unexpected: usize,
}

impl LiveAccount {
    /// Adds one subscription's account.
    pub fn add(&mut self, a: Account, stalled: bool) {
        if !stalled {
            self.checked += 1;
            self.total.missing += a.missing;
            self.subs_with_gaps += usize::from(a.missing > 0);
        }
        self.total.duplicates += a.duplicates;
        self.total.unexpected += a.unexpected;
        self.subs_with_duplicates += usize::from(a.duplicates > 0);
        self.subs_with_unexpected += usize::from(a.unexpected > 0);
    }

    /// Nothing missing, nothing twice, nothing unexpected.
    pub fn is_clean(&self) -> bool {
        self.total == Account::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 1_764_000_000_123;

    fn tally(keys: &[(u64, u64)]) -> SeqTally {
        let mut t = SeqTally::default();
        for &(e, s) in keys {
            t.record(e, s);
        }
        t
    }

    #[test]
    fn a_lost_and_a_duplicated_reading_are_one_gap_and_one_duplicate() {
        // Five sent, five delivered: seq 2 lost, seq 3 twice. A count of
        // deliveries sees no loss.
        let t = tally(&[(EPOCH, 0), (EPOCH, 1), (EPOCH, 3), (EPOCH, 3), (EPOCH, 4)]);
        let a = t.account(EPOCH, 5);
        assert_eq!(
            a,
            Account {
                missing: 1,
                duplicates: 1,
                unexpected: 0
            }
        );
        let mut run = LiveAccount::default();
        run.add(a, false);
        assert!(!run.is_clean());
        assert_eq!(run.subs_with_gaps, 1);
        assert_eq!(run.subs_with_duplicates, 1);
    }

    #[test]
    fn every_reading_once_is_clean() {
        let keys: Vec<_> = (0..1000).map(|s| (EPOCH, s)).collect();
        let t = tally(&keys);
        assert_eq!(t.distinct(), 1000);
        let a = t.account(EPOCH, 1000);
        assert_eq!(a, Account::default());
        let mut run = LiveAccount::default();
        run.add(a, false);
        assert!(run.is_clean());
        assert_eq!(run.checked, 1);
    }

    #[test]
    fn gaps_and_duplicates_are_counted_per_subscription() {
        // Two subscriptions of the same device: one lost seq 7, the other
        // got seq 7 twice. Summed deliveries equal 2 × sent; per
        // subscription both faults show.
        let sent = 10;
        let a: Vec<_> = (0..sent).filter(|&s| s != 7).map(|s| (EPOCH, s)).collect();
        let mut b: Vec<_> = (0..sent).map(|s| (EPOCH, s)).collect();
        b.push((EPOCH, 7));
        let mut run = LiveAccount::default();
        run.add(tally(&a).account(EPOCH, sent), false);
        run.add(tally(&b).account(EPOCH, sent), false);
        assert_eq!(
            run.total,
            Account {
                missing: 1,
                duplicates: 1,
                unexpected: 0
            }
        );
        assert_eq!((run.subs_with_gaps, run.subs_with_duplicates), (1, 1));
    }

    #[test]
    fn the_same_seq_in_another_epoch_is_not_the_same_reading() {
        let t = tally(&[(EPOCH, 0), (EPOCH + 1, 0), (EPOCH, 1)]);
        assert_eq!(
            t.account(EPOCH, 2),
            Account {
                missing: 0,
                duplicates: 0,
                unexpected: 1
            }
        );
    }

    #[test]
    fn seqs_past_the_last_sent_and_unreadable_frames_are_unexpected() {
        let mut t = tally(&[(EPOCH, 0), (EPOCH, 1), (EPOCH, 2), (EPOCH, 1 << 40)]);
        t.malformed();
        assert_eq!(
            t.account(EPOCH, 2),
            Account {
                missing: 0,
                duplicates: 0,
                unexpected: 3
            }
        );
        // The far seq is remembered too: a second copy is a duplicate.
        assert!(!t.record(EPOCH, 1 << 40));
        assert_eq!(t.account(EPOCH, 3).duplicates, 1);
    }

    #[test]
    fn word_boundaries() {
        for sent in [63u64, 64, 65, 128, 129] {
            let keys: Vec<_> = (0..sent).map(|s| (EPOCH, s)).collect();
            assert_eq!(tally(&keys).account(EPOCH, sent), Account::default());
            let short: Vec<_> = (1..sent).map(|s| (EPOCH, s)).collect();
            assert_eq!(tally(&short).account(EPOCH, sent).missing, 1, "{sent}");
        }
    }

    #[test]
    fn a_stalled_subscription_may_miss_but_not_duplicate() {
        let t = tally(&[(EPOCH, 0), (EPOCH, 0)]);
        let mut run = LiveAccount::default();
        run.add(t.account(EPOCH, 100), true);
        assert_eq!(run.checked, 0);
        assert_eq!(run.total.missing, 0);
        assert_eq!(run.total.duplicates, 1);
        assert!(!run.is_clean());
    }
}
