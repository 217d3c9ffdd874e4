//! Go `time.Duration` text syntax, as upstream AgentCube speaks it on the wire.
//!
//! Upstream stores `idleTimeout` as `"15m0s"`, PicoD takes `"timeout": "120.0s"`, and the CRDs take
//! `sessionTimeout: 1h30m`. [`GoDuration`] parses exactly what Go's `time.ParseDuration` accepts
//! (non-negative values only) and renders exactly what Go's `Duration.String()` prints, so records
//! written by us read back byte-identical in an upstream component.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration that parses and prints in Go syntax (`1h30m`, `1.5h`, `500ms`, `15m0s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty string, stray characters, or a number without a unit.
    #[error("time: invalid duration {0:?}")]
    Invalid(String),
    /// A unit that Go does not know (`"5d"`).
    #[error("time: unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit { unit: String, input: String },
    /// Overflows Go's int64 nanoseconds, or is negative.
    #[error("time: invalid duration {0:?} (out of range)")]
    OutOfRange(String),
}

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Go's `time.Duration` is an int64 of nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

impl GoDuration {
    /// Wraps a std duration.
    pub const fn new(d: Duration) -> Self {
        Self(d)
    }

    /// Whole seconds, rounded down.
    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }

    /// Parses Go duration syntax.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        parse_nanos(input).map(|n| Self(nanos_to_duration(n)))
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Self {
        d.0
    }
}

fn nanos_to_duration(n: u128) -> Duration {
    Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
}

fn parse_nanos(input: &str) -> Result<u128, DurationError> {
    let invalid = || DurationError::Invalid(input.to_string());
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        if unit.is_empty() {
            return Err(DurationError::Invalid(input.to_string()));
        }
        let scale = NANOS_PER_UNIT
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, n)| *n)
            .ok_or_else(|| DurationError::UnknownUnit {
                unit: unit.to_string(),
                input: input.to_string(),
            })?;
        let out_of_range = || DurationError::OutOfRange(input.to_string());
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| out_of_range())?
        };
        let mut value = whole.checked_mul(scale).ok_or_else(out_of_range)?;
        // Fractional part: accumulate digits while they still matter, like Go does.
        let mut frac_scale = scale;
        for digit in frac_part.bytes() {
            frac_scale /= 10;
            if frac_scale == 0 {
                break;
            }
            value += u128::from(digit - b'0') * frac_scale;
        }
        total = total.checked_add(value).ok_or_else(out_of_range)?;
        if total > MAX_NANOS {
            return Err(out_of_range());
        }
    }
    if negative && total != 0 {
        return Err(DurationError::OutOfRange(input.to_string()));
    }
    Ok(total)
}

impl FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for GoDuration {
    /// Same text as Go's `Duration.String()`: `0s`, `1.5ms`, `15m0s`, `8h0m0s`, `1h2m3.5s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000_000_000 {
            let (scale, unit) = match nanos {
                n if n < 1_000 => (1, "ns"),
                n if n < 1_000_000 => (1_000, "µs"),
                _ => (1_000_000, "ms"),
            };
            return write!(f, "{}{unit}", fixed(nanos, scale));
        }
        let hours = nanos / 3_600_000_000_000;
        let rem = nanos % 3_600_000_000_000;
        let minutes = rem / 60_000_000_000;
        let sec_nanos = rem % 60_000_000_000;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        write!(f, "{}s", fixed(sec_nanos, 1_000_000_000))
    }
}

/// `value / scale` printed with the shortest exact decimal fraction.
fn fixed(value: u128, scale: u128) -> String {
    let whole = value / scale;
    let frac = value % scale;
    if frac == 0 {
        return whole.to_string();
    }
    let width = scale.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Duration {
        GoDuration::parse(s).unwrap().0
    }

    #[test]
    fn parses_go_syntax() {
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("120.0s"), Duration::from_secs(120));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("15m0s"), Duration::from_secs(900));
        assert_eq!(d("0"), Duration::ZERO);
        assert_eq!(d("1us"), Duration::from_micros(1));
        assert_eq!(d("1µs"), Duration::from_micros(1));
        assert_eq!(d(".5s"), Duration::from_millis(500));
        assert_eq!(d("+5s"), Duration::from_secs(5));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            "", "30", "s", "1.s5", "5d", "1h30", "-5s", "abc", "1e3s", " 5s", ".",
        ] {
            assert!(
                GoDuration::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(
            GoDuration::parse("5d"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(GoDuration::parse("9999999999h").is_err());
    }

    #[test]
    fn prints_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(900), "15m0s"),
            (Duration::from_secs(8 * 3600), "8h0m0s"),
            (Duration::from_millis(3_723_500), "1h2m3.5s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(100), "100ns"),
            (Duration::from_micros(1), "1µs"),
            (Duration::from_secs(30), "30s"),
        ];
        for (dur, text) in cases {
            assert_eq!(GoDuration(dur).to_string(), text);
        }
    }

    #[test]
    fn serde_is_a_string() {
        let v = serde_json::to_string(&GoDuration(Duration::from_secs(900))).unwrap();
        assert_eq!(v, "\"15m0s\"");
        let back: GoDuration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(back.0, Duration::from_secs(5400));
        assert!(serde_json::from_str::<GoDuration>("\"soon\"").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(n in 0u64..(i64::MAX as u64)) {
            let dur = GoDuration(Duration::from_nanos(n));
            prop_assert_eq!(GoDuration::parse(&dur.to_string()).unwrap(), dur);
        }
    }
}
