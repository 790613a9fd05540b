//! Bench-testing tools for installers: `probe` and `scan` (placeholder; being written).

use std::path::Path;

/// `ems-edge probe`: reads each configured meter `count` times and prints a table.
pub fn probe(_config: &Path, _count: u32) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("probe is not implemented yet")
}

/// `ems-edge scan i2c`: lists responding I2C addresses on `bus`.
pub fn scan_i2c(_bus: u8) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("scan is not implemented yet")
}
