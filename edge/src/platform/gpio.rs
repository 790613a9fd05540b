//! GPIO (`/dev/gpiochip*`, group `gpio`): S0 pulse meters on an input pin
//! with an async interrupt. On a machine that is not a Pi, rppal reports
//! "not a Raspberry Pi".

use std::path::Path;
use std::time::Duration;

use rppal::gpio::{Gpio, Trigger};

use crate::meters::pulse::{self, Pull, PulseConfig, PulseMeter};
use crate::meters::{Meter, MeterError};

fn gpio_error(meter: &str, e: rppal::gpio::Error) -> MeterError {
    use rppal::gpio::Error as G;
    match e {
        G::UnknownModel => MeterError::new(meter, "GPIO: not a Raspberry Pi (or an unknown model)")
            .with_hint("pulse meters need a Raspberry Pi; use kind = \"simulated\" elsewhere"),
        G::PermissionDenied(node) => {
            MeterError::new(meter, format!("GPIO: permission denied on {node}")).with_hint(
                "add the service user to the gpio group (`sudo usermod -aG gpio <user>`)",
            )
        }
        G::PinUsed(p) => MeterError::new(meter, format!("GPIO{p} is already in use"))
            .with_hint("two meters (or another program) use the same pin"),
        G::PinNotAvailable(p) => {
            MeterError::new(meter, format!("GPIO{p} does not exist on this Pi"))
                .with_hint("`pin` is a BCM GPIO number, not a header pin number")
        }
        other => MeterError::new(meter, format!("GPIO: {other}")),
    }
}

/// Opens a pulse meter: the pin with its bias and an async interrupt that
/// feeds the shared counter with the kernel's event timestamps.
pub fn open_pulse(cfg: &PulseConfig, state_dir: &Path) -> Result<Box<dyn Meter>, MeterError> {
    let mut meter: PulseMeter<rppal::gpio::InputPin> = PulseMeter::new(cfg, state_dir)?;
    let gpio = Gpio::new().map_err(|e| gpio_error(&cfg.id, e))?;
    let pin = gpio.get(cfg.pin).map_err(|e| gpio_error(&cfg.id, e))?;
    let (mut input, trigger) = match cfg.pull {
        Pull::Up => (pin.into_input_pullup(), Trigger::FallingEdge),
        Pull::Down => (pin.into_input_pulldown(), Trigger::RisingEdge),
        Pull::None => (pin.into_input(), Trigger::FallingEdge),
    };
    let shared = meter.shared();
    let debounce = Some(Duration::from_millis(cfg.debounce_ms));
    input
        .set_async_interrupt(trigger, debounce, move |event| {
            pulse::record_event(&shared, event.timestamp, Some(event.seqno));
        })
        .map_err(|e| gpio_error(&cfg.id, e))?;
    meter.attach(input);
    Ok(Box::new(meter))
}
