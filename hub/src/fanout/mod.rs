//! Fan-out: how a valid reading reaches every dashboard that watches its
//! device, and who is connected at all.
//!
//! - [`registry`]: the connection manager (one device, one connection;
//!   kicks, takeover loops, presence, the edges' outbox status) and the
//!   per-device [`topic`]s.
//! - [`backfill`]: a device session counts its backlog readings into
//!   summaries before they reach the topic.
//! - `dashboard`: one dashboard session, from the upgrade to the close;
//!   `feed` writes topic frames to its socket, `classify` reads a topic
//!   frame's key, `resume` replays stored readings without gap or
//!   duplicate, `recheck` re-checks its viewer token, `lookup` runs its
//!   store queries.

pub(crate) mod backfill;
mod classify;
pub(crate) mod dashboard;
mod feed;
mod lookup;
mod recheck;
pub mod registry;
mod resume;
pub mod topic;

pub(crate) use dashboard::FeedOptions;
