//! Timestamps as the records and statuses carry them: RFC 3339 in UTC with
//! `Z`, written exactly as chrono's serde writes them (a fraction of 3, 6
//! or 9 digits, the shortest that is exact; none for a whole second), but
//! without `core::fmt`. Counted: chrono's way cost the worker about 5,100
//! instructions per decided record (two timestamps per status), 12 % of it
//! (docs/benchmarks.md, "Instructions, counted").
//!
//! Use with `#[serde(serialize_with = "crate::time::serialize")]`;
//! reading stays chrono's.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// Longest text: `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
pub(crate) const MAX_LEN: usize = 30;

/// Writes `t` into `buf`, returning the text; `None` for what chrono writes
/// differently (years outside 0..=9999, a leap second), left to chrono.
pub(crate) fn write<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; MAX_LEN]) -> Option<&'b str> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut put = |at: usize, value: u32, digits: usize| {
        let mut v = value;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second(), 2);
    let end = if nanos == 0 {
        19
    } else if nanos.is_multiple_of(1_000_000) {
        put(20, nanos / 1_000_000, 3);
        23
    } else if nanos.is_multiple_of(1_000) {
        put(20, nanos / 1_000, 6);
        26
    } else {
        put(20, nanos, 9);
        29
    };
    buf[4] = b'-';
    buf[7] = b'-';
    buf[10] = b'T';
    buf[13] = b':';
    buf[16] = b':';
    buf[19] = b'.';
    buf[end] = b'Z';
    std::str::from_utf8(&buf[..=end]).ok()
}

/// Serializes `t` as chrono's serde does.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    match write(t, &mut buf) {
        Some(text) => s.serialize_str(text),
        None => serde::Serialize::serialize(t, s),
    }
}

/// [`serialize`] for an optional timestamp (`null` when absent).
pub fn serialize_option<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::strategy::Strategy;

    fn ours(t: &DateTime<Utc>) -> String {
        let mut out = Vec::new();
        serialize(t, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_edges_are_written_as_chrono_writes_them() {
        let times = [
            Utc.with_ymd_and_hms(2026, 12, 4, 9, 5, 7).unwrap(),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(999, 2, 28, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            // Outside what it writes itself: chrono's own text.
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            // A leap second, which chrono writes as :60.
            Utc.from_utc_datetime(
                &chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                    .unwrap()
                    .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                    .unwrap(),
            ),
        ];
        for t in &times {
            assert_eq!(ours(t), serde_json::to_string(t).unwrap(), "{t:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Whole seconds, milliseconds, microseconds and nanoseconds.
        #[test]
        fn every_kind_of_fraction_is_written_as_chrono_writes_it(
            seconds in -1_000_000_000i64..3_000_000_000,
            nanos in proptest::prop_oneof![
                proptest::strategy::Just(0u32),
                (0u32..1_000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let t = Utc.timestamp_opt(seconds, nanos).unwrap();
            proptest::prop_assert_eq!(ours(&t), serde_json::to_string(&t).unwrap());
        }
    }

    #[test]
    fn an_absent_timestamp_is_null() {
        let mut out = Vec::new();
        serialize_option(&None, &mut serde_json::Serializer::new(&mut out)).unwrap();
        assert_eq!(out, b"null");
    }
}
