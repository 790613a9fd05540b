//! Meter drivers against scripted buses (embedded-hal-mock, a scripted
//! serial port) and datasheet vectors; one module per chip.
//!
//! Register addresses, bit fields and frames are written out literally here,
//! not imported from the drivers, so a wrong constant in `src/` fails a test.

use std::time::{Duration, Instant};

use ems_edge::meters::{Measurement, Meter, MeterConfig};

fn close(a: f64, b: f64, eps: f64) -> bool {
    (a - b).abs() <= eps
}

mod atm90e32;
mod ina219;
mod ina226;
mod modbus;
mod opening;
mod pulse;
