//! `kind = "simulated"`: a household supply (placeholder; being written).

use serde::Deserialize;

use super::{Measurement, Meter, MeterError};

/// Config of a simulated meter.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Meter id.
    pub id: String,
    /// Seed for reproducible output.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// A simulated meter.
pub struct Simulated {
    cfg: SimulatedConfig,
}

impl Simulated {
    /// Creates one.
    pub fn new(cfg: SimulatedConfig) -> Self {
        Simulated { cfg }
    }
}

impl Meter for Simulated {
    fn id(&self) -> &str {
        &self.cfg.id
    }
    fn read(&mut self) -> Result<Vec<Measurement>, MeterError> {
        Ok(vec![Measurement {
            meter: self.cfg.id.clone(),
            power_w: Some(100.0),
            ..Default::default()
        }])
    }
}
