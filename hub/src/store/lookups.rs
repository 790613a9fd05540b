//! Bounded look-ups for viewers and dashboards: the "last seen" of many
//! devices in one statement (the device list costs one query whatever the
//! fleet size), and whether one reading is stored (one index probe, for
//! the dashboard's resume seam).

use super::StoreError;

/// Look-ups whose cost does not grow with what a client asks for.
pub trait LookupStore: Send {
    /// For each of `device_ids`, in order: the receive time of its newest
    /// reading by sample time (as [`super::HistoryStore::last_seen`]), in
    /// one statement.
    fn last_seen_many(&mut self, device_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError>;

    /// Whether the reading `(epoch, seq)` of `device_id` is stored.
    fn reading_stored(&mut self, device_id: &str, epoch: u64, seq: u64)
        -> Result<bool, StoreError>;
}
