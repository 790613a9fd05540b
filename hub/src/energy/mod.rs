//! Energy rollups: local-time buckets, the counter-aware energy rule and
//! its fast slot-based path.

pub mod answer;
pub mod buckets;
pub mod csv;
pub mod flags;
pub mod rule;
pub mod slots;

#[cfg(test)]
mod proptests;
