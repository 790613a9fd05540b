//! The one list of measurements a reading can carry.
//!
//! Everything that handles "all the measurements" derives from the table in
//! `__measurement_list!` below: the [`Measurement`] enum and its metadata
//! (JSON key = column name, unit, valid range), the measurement fields of
//! [`crate::Reading`] and [`crate::DashboardReading`] (declared with
//! [`measurement_struct!`](crate::measurement_struct)), the decoder's range
//! checks, and — through [`Measurement::ALL`] and the [`Measured`] trait —
//! the hub's stores, the edge's meter values and the load generator.
//!
//! Adding a measurement means adding one row to the table, plus a database
//! migration that adds its column to `readings`.

/// The table. Each row: doc line, field/JSON/column name, enum variant,
/// unit, lowest and highest valid value.
///
/// Calls `$crate::$callback!` with a parenthesised context first (passed
/// through untouched) and then the rows. Internal: use [`Measurement`],
/// [`Measured`] and [`measurement_struct!`](crate::measurement_struct).
#[doc(hidden)]
#[macro_export]
macro_rules! __measurement_list {
    ($callback:ident ! ( $($context:tt)* )) => {
        $crate::$callback! {
            ( $($context)* )
            /// RMS voltage, volts, in [0, 2000].
            voltage_v, VoltageV, "V", 0.0, 2000.0;
            /// Current, amperes, in [-10000, 10000] (negative: export).
            current_a, CurrentA, "A", -10_000.0, 10_000.0;
            /// Active power, watts, in [-1e7, 1e7] (negative: export).
            power_w, PowerW, "W", -1e7, 1e7;
            /// Energy counter, watt-hours, in [0, 1e13]; never decreases
            /// except when a meter's counter is reset.
            energy_wh, EnergyWh, "Wh", 0.0, 1e13;
            /// Line frequency, hertz, in [0, 1000].
            frequency_hz, FrequencyHz, "Hz", 0.0, 1000.0;
            /// Power factor, in [-1, 1].
            power_factor, PowerFactor, "", -1.0, 1.0;
            /// Reactive power, var, in [-1e7, 1e7].
            reactive_power_var, ReactivePowerVar, "var", -1e7, 1e7;
        }
    };
}

/// Generates [`Measurement`] from the table.
#[doc(hidden)]
#[macro_export]
macro_rules! __measurement_enum {
    ( ()
      $(#[$first_doc:meta])* $first:ident, $first_variant:ident, $first_unit:literal, $first_min:expr, $first_max:expr;
      $( $(#[$doc:meta])* $field:ident, $variant:ident, $unit:literal, $min:expr, $max:expr; )*
    ) => {
        /// One kind of measurement a reading can carry. Non-exhaustive: the
        /// list grows, so code outside this crate that matches on it needs a
        /// fallback arm.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Measurement {
            $(#[$first_doc])*
            $first_variant,
            $( $(#[$doc])* $variant, )*
        }

        impl Measurement {
            /// Every measurement, in wire and column order.
            pub const ALL: [Measurement; 1 $( + { let _ = stringify!($variant); 1 } )*] =
                [Measurement::$first_variant $(, Measurement::$variant)*];

            /// How many measurements there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The column names of every measurement, in order, separated
            /// by `", "` — for SQL column lists.
            pub const COLUMNS: &'static str =
                concat!(stringify!($first) $(, ", ", stringify!($field))*);

            /// The JSON key, which is also the database column name
            /// (e.g. `power_w`).
            pub const fn name(self) -> &'static str {
                match self {
                    Measurement::$first_variant => stringify!($first),
                    $( Measurement::$variant => stringify!($field), )*
                }
            }

            /// The unit (`""` for the dimensionless power factor).
            pub const fn unit(self) -> &'static str {
                match self {
                    Measurement::$first_variant => $first_unit,
                    $( Measurement::$variant => $unit, )*
                }
            }

            /// The lowest and highest valid value (inclusive).
            pub const fn range(self) -> (f64, f64) {
                match self {
                    Measurement::$first_variant => ($first_min, $first_max),
                    $( Measurement::$variant => ($min, $max), )*
                }
            }

            /// Position in [`Measurement::ALL`].
            pub const fn index(self) -> usize {
                self as usize
            }

            /// The measurement with this JSON key / column name.
            pub fn from_name(name: &str) -> Option<Measurement> {
                Measurement::ALL.into_iter().find(|m| m.name() == name)
            }
        }
    };
}

__measurement_list!(__measurement_enum!());

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A value that carries one optional number per [`Measurement`]: a reading,
/// a dashboard frame, an edge meter's values. Implemented by every struct
/// declared with [`measurement_struct!`](crate::measurement_struct).
pub trait Measured {
    /// The value of `m`, if present.
    fn get(&self, m: Measurement) -> Option<f64>;

    /// Sets (or, with `None`, clears) the value of `m`.
    fn set(&mut self, m: Measurement, value: Option<f64>);

    /// The present measurements with their values, in order.
    fn present(&self) -> impl Iterator<Item = (Measurement, f64)> + '_ {
        Measurement::ALL
            .into_iter()
            .filter_map(|m| self.get(m).map(|v| (m, v)))
    }

    /// Copies every measurement (present or absent) from `other`.
    fn set_measurements_from(&mut self, other: &impl Measured) {
        for m in Measurement::ALL {
            self.set(m, other.get(m));
        }
    }
}

/// Declares a struct with the given fields followed by one
/// `pub <name>: Option<f64>` field per [`Measurement`], documented from the
/// table, and implements [`Measured`] for it.
///
/// Written `measurement_struct! { serde: … }`, every measurement field also
/// gets `#[serde(default, skip_serializing_if = "Option::is_none")]` (absent
/// on the wire when `None`), for structs that derive serde's traits.
///
/// ```
/// ems_shared::measurement_struct! {
///     /// One meter's values.
///     #[derive(Debug, Default)]
///     pub struct Values {
///         /// Which meter.
///         pub meter: String,
///     }
/// }
/// use ems_shared::{Measured, Measurement};
/// let mut v = Values::default();
/// v.set(Measurement::PowerW, Some(5.0));
/// assert_eq!(v.power_w, Some(5.0));
/// assert_eq!(v.present().count(), 1);
/// ```
#[macro_export]
macro_rules! measurement_struct {
    (
        serde:
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $fname:ident : $fty:ty ),* $(,)?
        }
    ) => {
        $crate::__measurement_list!(__measurement_struct_impl!(
            serde [$(#[$meta])*] [$vis] $name
            [$( $(#[$fmeta])* $fvis $fname : $fty, )*]
        ));
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $fname:ident : $fty:ty ),* $(,)?
        }
    ) => {
        $crate::__measurement_list!(__measurement_struct_impl!(
            plain [$(#[$meta])*] [$vis] $name
            [$( $(#[$fmeta])* $fvis $fname : $fty, )*]
        ));
    };
}

/// Expands [`measurement_struct!`] with the table.
#[doc(hidden)]
#[macro_export]
macro_rules! __measurement_struct_impl {
    (
        ( serde [$($meta:tt)*] [$vis:vis] $name:ident [$($fixed:tt)*] )
        $( $(#[$doc:meta])* $field:ident, $variant:ident, $unit:literal, $min:expr, $max:expr; )*
    ) => {
        $($meta)*
        $vis struct $name {
            $($fixed)*
            $(
                $(#[$doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<f64>,
            )*
        }
        $crate::__measured_impl!($name $($field $variant)*);
    };
    (
        ( plain [$($meta:tt)*] [$vis:vis] $name:ident [$($fixed:tt)*] )
        $( $(#[$doc:meta])* $field:ident, $variant:ident, $unit:literal, $min:expr, $max:expr; )*
    ) => {
        $($meta)*
        $vis struct $name {
            $($fixed)*
            $( $(#[$doc])* pub $field: Option<f64>, )*
        }
        $crate::__measured_impl!($name $($field $variant)*);
    };
}

/// The [`Measured`] impl of a struct declared with [`measurement_struct!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __measured_impl {
    ($name:ident $($field:ident $variant:ident)*) => {
        impl $crate::Measured for $name {
            fn get(&self, m: $crate::Measurement) -> Option<f64> {
                // The struct has a field for every variant of the same table;
                // the wildcard arm only satisfies `#[non_exhaustive]` when
                // the macro is used outside ems-shared.
                #[allow(unreachable_patterns)]
                match m {
                    $( $crate::Measurement::$variant => self.$field, )*
                    _ => None,
                }
            }

            fn set(&mut self, m: $crate::Measurement, value: Option<f64>) {
                #[allow(unreachable_patterns)]
                match m {
                    $( $crate::Measurement::$variant => self.$field = value, )*
                    _ => {}
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_in_wire_order() {
        let names: Vec<_> = Measurement::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(
            names,
            [
                "voltage_v",
                "current_a",
                "power_w",
                "energy_wh",
                "frequency_hz",
                "power_factor",
                "reactive_power_var"
            ]
        );
        assert_eq!(Measurement::COUNT, 7);
        assert_eq!(
            Measurement::COLUMNS,
            "voltage_v, current_a, power_w, energy_wh, frequency_hz, power_factor, reactive_power_var"
        );
        for (i, m) in Measurement::ALL.iter().enumerate() {
            assert_eq!(m.index(), i);
            assert_eq!(Measurement::from_name(m.name()), Some(*m));
        }
        assert_eq!(Measurement::from_name("power"), None);
    }

    #[test]
    fn units_and_ranges_are_the_documented_ones() {
        let table: Vec<_> = Measurement::ALL
            .iter()
            .map(|m| (m.unit(), m.range()))
            .collect();
        assert_eq!(
            table,
            [
                ("V", (0.0, 2000.0)),
                ("A", (-10_000.0, 10_000.0)),
                ("W", (-1e7, 1e7)),
                ("Wh", (0.0, 1e13)),
                ("Hz", (0.0, 1000.0)),
                ("", (-1.0, 1.0)),
                ("var", (-1e7, 1e7)),
            ]
        );
    }

    crate::measurement_struct! {
        #[derive(Debug, Default, PartialEq)]
        struct Probe {
            tag: u8,
        }
    }

    #[test]
    fn generated_structs_get_and_set_by_kind() {
        let mut p = Probe::default();
        for (i, m) in Measurement::ALL.into_iter().enumerate() {
            p.set(m, Some(i as f64));
        }
        assert_eq!(p.voltage_v, Some(0.0));
        assert_eq!(p.reactive_power_var, Some(6.0));
        assert_eq!(p.present().count(), 7);
        let mut q = Probe {
            tag: 1,
            ..Default::default()
        };
        q.set_measurements_from(&p);
        assert_eq!(q.power_w, Some(2.0));
        assert_eq!(q.tag, 1);
        q.set(Measurement::PowerW, None);
        assert_eq!(q.get(Measurement::PowerW), None);
    }
}
