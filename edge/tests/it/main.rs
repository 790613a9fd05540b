//! Integration tests of the edge: the real hub crate in-process on a
//! loopback port, the real `ems-edge` binary as a child process. One test
//! binary, one module per behaviour area; [`harness`] holds what they share.

mod backlog;
mod chaos;
mod cli;
mod clock_sync;
mod disk_full;
mod energy;
mod harness;
mod lifecycle;
mod liveness;
mod outage;
mod refusals;
mod tls;
