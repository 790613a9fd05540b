//! `timestamptz` as Unix milliseconds: [`PgTime`] encodes and decodes
//! PostgreSQL's binary format directly, without overflow.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use postgres::types::{FromSql, IsNull, ToSql, Type};

/// Unix ms of 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch.
pub(super) const PG_EPOCH_MS: i64 = 946_684_800_000;
/// Earliest timestamptz PostgreSQL stores (4713-11-24 BC), Unix ms.
pub(super) const PG_MIN_MS: i64 = -210_866_803_200_000;
/// Just past the latest timestamptz PostgreSQL stores (294277 AD), Unix ms.
pub(super) const PG_END_MS: i64 = 9_224_318_016_000_000;

/// A `timestamptz` as Unix milliseconds, encoded directly in PostgreSQL's
/// binary format (µs since 2000-01-01) without overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PgTime(pub(super) i64);

impl ToSql for PgTime {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if !(PG_MIN_MS..PG_END_MS).contains(&self.0) {
            return Err(format!("timestamp {} ms is out of PostgreSQL's range", self.0).into());
        }
        out.put_i64((self.0 - PG_EPOCH_MS) * 1000);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if !<Self as ToSql>::accepts(ty) {
            return Err(format!("PgTime cannot encode {ty}").into());
        }
        self.to_sql(ty, out)
    }
}

impl<'a> FromSql<'a> for PgTime {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let b: [u8; 8] = raw.try_into()?;
        let micros = i64::from_be_bytes(b);
        if micros == i64::MAX || micros == i64::MIN {
            return Err("infinite timestamp".into());
        }
        Ok(PgTime(micros.div_euclid(1000) + PG_EPOCH_MS))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

/// Clamps a query bound into the representable range.
pub(super) fn clamp_ms(ms: i64) -> PgTime {
    PgTime(ms.clamp(PG_MIN_MS, PG_END_MS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_encode_exactly() {
        let mut b = BytesMut::new();
        PgTime(PG_EPOCH_MS + 1)
            .to_sql(&Type::TIMESTAMPTZ, &mut b)
            .unwrap();
        assert_eq!(&b[..], &1000i64.to_be_bytes());
        for ms in [0, -1, 1_700_000_000_123, PG_MIN_MS, PG_END_MS - 1] {
            let mut b = BytesMut::new();
            PgTime(ms).to_sql(&Type::TIMESTAMPTZ, &mut b).unwrap();
            let back = PgTime::from_sql(&Type::TIMESTAMPTZ, &b).unwrap();
            assert_eq!(back, PgTime(ms));
        }
        for ms in [i64::MIN, i64::MAX, PG_END_MS, PG_MIN_MS - 1] {
            let mut b = BytesMut::new();
            assert!(PgTime(ms).to_sql(&Type::TIMESTAMPTZ, &mut b).is_err());
        }
        assert!(PgTime(0).to_sql_checked(&Type::INT8, &mut b).is_err());
    }
}
