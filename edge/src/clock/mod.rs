//! Time: knowing when the wall clock can be trusted, and stamping readings.
//!
//! A Raspberry Pi has no real-time clock: until NTP has synchronized it, the
//! wall clock may be hours off (fake-hwclock restores the last shutdown time).
//! The edge never sends a time it knows is wrong. Until the clock is
//! synchronized, readings are *held* in memory with their monotonic sample
//! instant ([`ClockGate`]); once it is, each held reading is stamped
//! `wall_now − (mono_now − mono_sampled)` and released in sample order. The
//! monotonic clock is unaffected by the NTP step, so the stamps are right
//! (why: `docs/decisions/edge-clock-gate.md`).
//!
//! - [`sync`]: whether the clock is synchronized ([`SystemSync`]).
//! - [`gate`]: the [`ClockGate`] that holds readings until then and stamps
//!   them.
//! - [`held`]: held readings across a restart in the same boot.
//! - [`epoch`]: this process's epoch, the first half of every reading's
//!   identity.

pub mod epoch;
pub mod gate;
pub mod held;
pub mod sync;

pub use gate::{unix_ms, ClockGate, Stamped};
pub use sync::{SyncProbe, SystemSync, TIMESYNC_FLAG};
