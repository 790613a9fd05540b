//! The field names a serde `Deserialize` struct accepts (renames and
//! aliases included), read from what its derived impl hands the
//! deserializer — so a test can compare them with a documented key list.

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// The names `T` (a struct deriving `Deserialize`) accepts as keys.
/// Panics when `T` does not deserialize as a struct.
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut found = None;
    let _ = T::deserialize(Probe(&mut found));
    found.unwrap_or_else(|| {
        panic!(
            "{} does not deserialize as a struct",
            std::any::type_name::<T>()
        )
    })
}

/// A deserializer that records the field list of `deserialize_struct`
/// and fails everything.
struct Probe<'a>(&'a mut Option<&'static [&'static str]>);

/// The probe's only outcome.
#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = Some(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        a: u8,
        #[serde(rename = "bee")]
        b: String,
        #[serde(alias = "sea")]
        c: Option<f64>,
    }

    #[test]
    fn lists_renames_and_aliases() {
        let mut names = super::field_names::<Sample>().to_vec();
        names.sort_unstable();
        assert_eq!(names, ["a", "bee", "c", "sea"]);
    }
}
