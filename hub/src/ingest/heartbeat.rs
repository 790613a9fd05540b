//! The device connections' heartbeat: one task for all of them, instead
//! of a timer in every connection.
//!
//! Every `ping_interval / HEARTBEAT_PHASES` the task runs one round of
//! [`Registry::heartbeat`](crate::fanout::registry::Registry::heartbeat),
//! which ticks the mailbox of the connections in that round's phase; each
//! connection is ticked once per `ping_interval`. The session decides on
//! the tick (`SessionState::tick`): nothing if the device sent a frame
//! since the last one, else a ping, and after `max_missed_pongs`
//! unanswered pings the connection is dead.
//!
//! A timer per connection cost every idle connection its boxed `Sleep`
//! and the `Interval` in its task; a round walks the registry's map under
//! its lock (a few µs per thousand connections).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::fanout::registry::HEARTBEAT_PHASES;
use crate::shutdown::shutting_down;
use crate::state::Shared;

/// The time between two rounds for `ping_interval`.
pub(crate) fn round_every(ping_interval: Duration) -> Duration {
    (ping_interval / u32::from(HEARTBEAT_PHASES)).max(Duration::from_millis(1))
}

/// Runs the rounds until the hub shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    let every = round_every(shared.config.ping_interval);
    let mut rounds = tokio::time::interval(every);
    // A late round is run once, not caught up in a burst.
    rounds.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stop = shared.shutdown.clone();
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = shutting_down(&mut stop) => return,
            _ = rounds.tick() => {
                round += 1;
                shared.registry.heartbeat(round);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_a_phase_of_the_interval() {
        assert_eq!(round_every(Duration::from_secs(16)), Duration::from_secs(1));
        assert_eq!(
            round_every(Duration::from_millis(4)),
            Duration::from_millis(1)
        );
    }
}
