//! Avro's date and time logical types: what their integers mean, and their
//! text (pure).
//!
//! The decoder keeps each as the integer Avro wrote with its kind and unit
//! ([`Temporal`]), so no stage has to guess a unit: a `timestamp-micros`
//! read as milliseconds lands 1,000 times too far in the future, silently.
//! Text is built on the stack two digits at a time, not with `format!`:
//! every timestamp of a batch passes here.

use std::fmt;

/// How finely a time is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    Millis,
    Micros,
    Nanos,
}

impl Unit {
    pub const fn per_second(self) -> i64 {
        match self {
            Unit::Millis => 1_000,
            Unit::Micros => 1_000_000,
            Unit::Nanos => 1_000_000_000,
        }
    }

    pub const fn per_day(self) -> i64 {
        self.per_second() * 86_400
    }

    /// Digits after the seconds' point.
    const fn digits(self) -> u32 {
        match self {
            Unit::Millis => 3,
            Unit::Micros => 6,
            Unit::Nanos => 9,
        }
    }

    const fn suffix(self) -> &'static str {
        match self {
            Unit::Millis => "millis",
            Unit::Micros => "micros",
            Unit::Nanos => "nanos",
        }
    }
}

/// Which logical type an integer was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeKind {
    /// `date`: days since 1970-01-01.
    Date,
    /// `time-millis`, `time-micros`: time of day after midnight, in
    /// `[0, 24h)` (the decoder refuses others).
    TimeOfDay(Unit),
    /// `timestamp-*`: an instant, counted from 1970-01-01T00:00:00Z.
    Timestamp(Unit),
    /// `local-timestamp-*`: a wall-clock date and time in no time zone,
    /// counted from 1970-01-01T00:00:00 on that clock.
    LocalTimestamp(Unit),
}

/// A date or time value: the integer Avro wrote and what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Temporal {
    pub kind: TimeKind,
    pub value: i64,
}

/// How a year outside 1..=9999 is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// ISO 8601 (JSON, Elasticsearch): astronomical years, signed beyond
    /// four digits (`0000` is 1 BC, `-0001` 2 BC, `+10000`).
    Iso,
    /// As Postgres reads and writes them: `0001-12-31 BC` is year 0.
    Postgres,
}

impl Temporal {
    pub const fn new(kind: TimeKind, value: i64) -> Temporal {
        Temporal { kind, value }
    }

    /// Whether it is a value its type allows: a time of day lies within
    /// its day; every date and timestamp integer is one.
    pub fn is_valid(&self) -> bool {
        match self.kind {
            TimeKind::TimeOfDay(unit) => (0..unit.per_day()).contains(&self.value),
            _ => true,
        }
    }

    /// The Avro logical type's name, for messages.
    pub fn logical_type(&self) -> String {
        match self.kind {
            TimeKind::Date => "date".to_string(),
            TimeKind::TimeOfDay(unit) => format!("time-{}", unit.suffix()),
            TimeKind::Timestamp(unit) => format!("timestamp-{}", unit.suffix()),
            TimeKind::LocalTimestamp(unit) => format!("local-timestamp-{}", unit.suffix()),
        }
    }

    /// The day it falls on (days since 1970-01-01), for dates and
    /// timestamps; a timestamp's day is its UTC day.
    pub fn day(&self) -> Option<i64> {
        match self.kind {
            TimeKind::Date => Some(self.value),
            TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit) => Some(self.value.div_euclid(unit.per_day())),
            TimeKind::TimeOfDay(_) => None,
        }
    }

    /// Its time of day (UTC for timestamps), for times and timestamps.
    pub fn time_of_day(&self) -> Option<Temporal> {
        match self.kind {
            TimeKind::TimeOfDay(_) => Some(*self),
            TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit) => {
                Some(Temporal::new(TimeKind::TimeOfDay(unit), self.value.rem_euclid(unit.per_day())))
            }
            TimeKind::Date => None,
        }
    }

    /// As an instant: a local timestamp read as UTC, a date as its
    /// midnight (UTC); a time of day is no instant.
    pub fn as_instant(&self) -> Option<Temporal> {
        match self.kind {
            TimeKind::Timestamp(_) => Some(*self),
            TimeKind::LocalTimestamp(unit) => Some(Temporal::new(TimeKind::Timestamp(unit), self.value)),
            TimeKind::Date => Some(Temporal::new(
                TimeKind::Timestamp(Unit::Millis),
                self.value.saturating_mul(Unit::Millis.per_day()),
            )),
            TimeKind::TimeOfDay(_) => None,
        }
    }

    /// Writes its text: `2023-11-14`, `22:13:20.123456`,
    /// `2023-11-14T22:13:20.123Z` (timestamps), `2023-11-14T22:13:20.123`
    /// (local timestamps), with as many fraction digits as its unit counts.
    /// Into any writer, so JSON and `COPY` text take it without a `String`
    /// of its own per value.
    pub fn write(&self, style: Style, out: &mut impl fmt::Write) -> fmt::Result {
        out.write_str(self.text(style)?.as_str())
    }

    /// Its text (as [`Temporal::write`] writes it) on the stack: a
    /// writer's `write_char` per digit cost ~650 instructions a timestamp
    /// (issue 27). `Err` only past the buffer, which no text reaches.
    pub fn text(&self, style: Style) -> Result<TimeText, fmt::Error> {
        let mut text = TimeText::new();
        match self.kind {
            TimeKind::Date => {
                let era = text.date(self.value, style)?;
                text.push(era.as_bytes())?;
            }
            TimeKind::TimeOfDay(unit) => text.time(day_and_time(self.value, unit).1, unit)?,
            TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit) => {
                let (day, in_day) = day_and_time(self.value, unit);
                let era = text.date(day, style)?;
                text.push(b"T")?;
                text.time(in_day, unit)?;
                if matches!(self.kind, TimeKind::Timestamp(_)) {
                    text.push(b"Z")?;
                }
                text.push(era.as_bytes())?;
            }
        }
        Ok(text)
    }

    pub fn to_text(&self, style: Style) -> String {
        let mut out = String::with_capacity(32);
        // Writing to a String cannot fail.
        let _ = self.write(style, &mut out);
        out
    }
}

/// ISO 8601 text.
impl fmt::Display for Temporal {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.write(Style::Iso, f)
    }
}

/// `value` (counted in `unit` from 1970-01-01T00:00) as its day and the
/// time within that day. Each unit's divisor is a constant, which the
/// compiler turns into a multiplication: this runs for every timestamp
/// of a batch.
fn day_and_time(value: i64, unit: Unit) -> (i64, i64) {
    const fn split<const PER_DAY: i64>(value: i64) -> (i64, i64) {
        (value.div_euclid(PER_DAY), value.rem_euclid(PER_DAY))
    }
    match unit {
        Unit::Millis => split::<{ Unit::Millis.per_day() }>(value),
        Unit::Micros => split::<{ Unit::Micros.per_day() }>(value),
        Unit::Nanos => split::<{ Unit::Nanos.per_day() }>(value),
    }
}

/// The text of one date or time, built in place: at most 32 bytes (a
/// timestamp in milliseconds at the ends of i64: a nine-digit year, the
/// time, ` BC`; dates are clamped to ten-digit years), in 48.
pub struct TimeText {
    bytes: [u8; 48],
    len: usize,
}

impl TimeText {
    fn new() -> TimeText {
        TimeText { bytes: [0; 48], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        super::utf8(&self.bytes[..self.len]).expect("only ASCII is pushed: digits, `-:.TZ+`, ` BC`")
    }

    /// Room for `width` more bytes; `Err` past the buffer (no text here
    /// is that long).
    fn room(&mut self, width: usize) -> Result<&mut [u8], fmt::Error> {
        let at = self.len;
        let room = self.bytes.get_mut(at..at + width).ok_or(fmt::Error)?;
        self.len += width;
        Ok(room)
    }

    fn push(&mut self, bytes: &[u8]) -> fmt::Result {
        self.room(bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    /// `n` (0 ≤ n < 10^width) in exactly `width` digits, two at a time
    /// from the last (a division by the constant 100 per pair).
    fn digits(&mut self, n: i64, width: usize) -> fmt::Result {
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
                                    2021222324252627282930313233343536373839\
                                    4041424344454647484950515253545556575859\
                                    6061626364656667686970717273747576777879\
                                    8081828384858687888990919293949596979899";
        let mut n = n.unsigned_abs();
        let mut room = self.room(width)?;
        while let [rest @ .., tens, ones] = room {
            let pair = (n % 100) as usize * 2;
            (*tens, *ones) = (PAIRS[pair], PAIRS[pair + 1]);
            n /= 100;
            room = rest;
        }
        if let [digit] = room {
            *digit = b'0' + (n % 10) as u8;
        }
        Ok(())
    }

    /// `HH:MM:SS.fff…` for a time within a day, counted in `unit`.
    fn time(&mut self, in_day: i64, unit: Unit) -> fmt::Result {
        let (seconds, fraction) = match unit {
            Unit::Millis => (in_day / 1_000, in_day % 1_000),
            Unit::Micros => (in_day / 1_000_000, in_day % 1_000_000),
            Unit::Nanos => (in_day / 1_000_000_000, in_day % 1_000_000_000),
        };
        self.digits(seconds / 3600, 2)?;
        self.push(b":")?;
        self.digits(seconds / 60 % 60, 2)?;
        self.push(b":")?;
        self.digits(seconds % 60, 2)?;
        self.push(b".")?;
        self.digits(fraction, unit.digits() as usize)
    }

    /// Writes the date of a day (days since 1970-01-01, proleptic
    /// Gregorian) and returns what must follow the whole text (` BC` for
    /// Postgres years before 1, which it writes at the end).
    fn date(&mut self, days: i64, style: Style) -> Result<&'static str, fmt::Error> {
        let (year, month, day) = civil_from_days(days);
        let era = match style {
            // Year 0 is 1 BC, -1 is 2 BC.
            Style::Postgres if year <= 0 => {
                self.year(1 - year)?;
                " BC"
            }
            Style::Postgres => {
                self.year(year)?;
                ""
            }
            Style::Iso if (0..=9999).contains(&year) => {
                self.digits(year, 4)?;
                ""
            }
            Style::Iso => {
                // The rare path: ISO's expanded years carry a sign.
                fmt::Write::write_fmt(self, format_args!("{year:+05}"))?;
                ""
            }
        };
        self.push(b"-")?;
        self.digits(month, 2)?;
        self.push(b"-")?;
        self.digits(day, 2)?;
        Ok(era)
    }

    fn year(&mut self, year: i64) -> fmt::Result {
        if (0..=9999).contains(&year) {
            self.digits(year, 4)
        } else {
            // Years Postgres mostly refuses anyway.
            fmt::Write::write_fmt(self, format_args!("{year:04}"))
        }
    }
}

impl fmt::Write for TimeText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes())
    }
}

/// (astronomical year, month, day) of days since 1970-01-01: Howard
/// Hinnant's civil_from_days, clamped so that no day (an event's i64)
/// overflows: years beyond what a store holds are refused by the store,
/// as that event's error.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days.clamp(-(1 << 40), 1 << 40);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(unit: Unit, value: i64) -> String {
        Temporal::new(TimeKind::Timestamp(unit), value).to_text(Style::Postgres)
    }

    fn date(days: i64, style: Style) -> String {
        Temporal::new(TimeKind::Date, days).to_text(style)
    }

    #[test]
    fn each_unit_keeps_its_digits() {
        assert_eq!(ts(Unit::Millis, 1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(ts(Unit::Micros, 1_700_000_000_123_456), "2023-11-14T22:13:20.123456Z");
        assert_eq!(ts(Unit::Nanos, 1_700_000_000_123_456_789), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(ts(Unit::Micros, -1), "1969-12-31T23:59:59.999999Z");
        let local = Temporal::new(TimeKind::LocalTimestamp(Unit::Micros), 1_700_000_000_000_001);
        assert_eq!(local.to_string(), "2023-11-14T22:13:20.000001");
        let time = Temporal::new(TimeKind::TimeOfDay(Unit::Micros), 86_399_999_999);
        assert_eq!(time.to_string(), "23:59:59.999999");
        assert_eq!(Temporal::new(TimeKind::TimeOfDay(Unit::Millis), 0).to_string(), "00:00:00.000");
        assert_eq!(Temporal::new(TimeKind::Date, 19_723).to_string(), "2024-01-01");
        assert_eq!(local.logical_type(), "local-timestamp-micros");
    }

    /// The stack text has room for the longest text: every kind, unit and
    /// style at the ends of i64 and of the clamped days, and around them.
    #[test]
    fn the_longest_texts_fit() {
        let kinds = [Unit::Millis, Unit::Micros, Unit::Nanos]
            .into_iter()
            .flat_map(|unit| [TimeKind::Timestamp(unit), TimeKind::LocalTimestamp(unit), TimeKind::TimeOfDay(unit)]);
        let values = [i64::MIN, i64::MIN + 1, -(1 << 40) - 1, -(1 << 40), -1, 0, 1 << 40, (1 << 40) + 1, i64::MAX];
        for kind in kinds.chain([TimeKind::Date]) {
            for value in values {
                for style in [Style::Iso, Style::Postgres] {
                    let text = Temporal::new(kind, value).text(style).expect("fits");
                    assert!(text.as_str().len() >= 8, "{kind:?} {value} {style:?}: {:?}", text.as_str());
                }
            }
        }
        assert_eq!(date(-(1 << 40), Style::Postgres).len(), 19, "the longest date: ten digits, ` BC`");
    }

    #[test]
    fn days_times_and_instants_of_each_other() {
        let at = Temporal::new(TimeKind::Timestamp(Unit::Nanos), -1);
        assert_eq!(at.day(), Some(-1));
        assert_eq!(at.time_of_day().expect("a timestamp has a time").to_string(), "23:59:59.999999999");
        let local = Temporal::new(TimeKind::LocalTimestamp(Unit::Millis), 5);
        assert_eq!(local.as_instant(), Some(Temporal::new(TimeKind::Timestamp(Unit::Millis), 5)));
        assert_eq!(
            Temporal::new(TimeKind::Date, 2).as_instant().expect("a date has a midnight").to_string(),
            "1970-01-03T00:00:00.000Z"
        );
        assert_eq!(Temporal::new(TimeKind::TimeOfDay(Unit::Millis), 1).as_instant(), None);
        assert_eq!(Temporal::new(TimeKind::TimeOfDay(Unit::Millis), 1).day(), None);
    }

    /// Random values of every kind and unit against chrono's calendar.
    #[test]
    fn every_kind_matches_an_independent_calendar() {
        use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7143);
        let fraction = |unit: Unit| match unit {
            Unit::Millis => ("%.3f", SecondsFormat::Millis),
            Unit::Micros => ("%.6f", SecondsFormat::Micros),
            Unit::Nanos => ("%.9f", SecondsFormat::Nanos),
        };
        for _ in 0..20_000 {
            let unit = [Unit::Millis, Unit::Micros, Unit::Nanos][rng.random_range(0..3)];
            // Years 1 to 9999 (nanoseconds reach 1677 to 2262 only).
            let range = match unit {
                Unit::Nanos => i64::MIN..i64::MAX,
                _ => -62_135_596_800 * unit.per_second()..253_402_300_799 * unit.per_second(),
            };
            let value = rng.random_range(range);
            let (seconds, sub) = (value.div_euclid(unit.per_second()), value.rem_euclid(unit.per_second()));
            let nanos = u32::try_from(sub * (1_000_000_000 / unit.per_second())).expect("below a second");
            let instant = DateTime::from_timestamp(seconds, nanos).expect("in chrono's range");
            let (naive_fraction, format) = fraction(unit);
            assert_eq!(
                Temporal::new(TimeKind::Timestamp(unit), value).to_string(),
                instant.to_rfc3339_opts(format, true),
                "{value} {unit:?}"
            );
            assert_eq!(
                Temporal::new(TimeKind::LocalTimestamp(unit), value).to_string(),
                instant.naive_utc().format(&format!("%Y-%m-%dT%H:%M:%S{naive_fraction}")).to_string()
            );
            if unit != Unit::Nanos {
                let in_day = value.rem_euclid(unit.per_day());
                let (s, sub) = (in_day / unit.per_second(), in_day % unit.per_second());
                let time = NaiveTime::from_num_seconds_from_midnight_opt(
                    u32::try_from(s).expect("within a day"),
                    u32::try_from(sub * (1_000_000_000 / unit.per_second())).expect("below a second"),
                )
                .expect("a time of day");
                assert_eq!(
                    Temporal::new(TimeKind::TimeOfDay(unit), in_day).to_string(),
                    time.format(&format!("%H:%M:%S{naive_fraction}")).to_string()
                );
            }
            let days = rng.random_range(-719_162..2_932_897);
            let date =
                NaiveDate::from_num_days_from_ce_opt(i32::try_from(days + 719_163).expect("small")).expect("a date");
            assert_eq!(Temporal::new(TimeKind::Date, days).to_string(), date.format("%Y-%m-%d").to_string(), "{days}");
        }
    }

    #[test]
    fn dates_against_a_reference_over_centuries() {
        // Against the `format!` it replaced, over four centuries by odd steps.
        let reference = |millis: i64| {
            let days = millis.div_euclid(86_400_000);
            let in_day = millis.rem_euclid(86_400_000);
            let (h, m, s, ms) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
            format!("{}T{h:02}:{m:02}:{s:02}.{ms:03}Z", date(days, Style::Postgres))
        };
        let mut millis = -12_219_292_800_000i64; // 1582-10-15
        while millis < 253_402_300_799_999 {
            assert_eq!(ts(Unit::Millis, millis), reference(millis), "{millis}");
            millis += 7_777_777_777;
        }
        assert_eq!(date(-719_528, Style::Postgres), "0001-01-01 BC");
        assert_eq!(date(-719_528, Style::Iso), "0000-01-01");
        assert_eq!(date(-719_162, Style::Postgres), "0001-01-01");
        assert_eq!(date(-719_163, Style::Postgres), "0001-12-31 BC");
        assert_eq!(date(-719_529, Style::Postgres), "0002-12-31 BC");
        assert_eq!(date(-719_529, Style::Iso), "-0001-12-31");
        assert_eq!(ts(Unit::Millis, -62_135_596_800_001), "0001-12-31T23:59:59.999Z BC");
        assert!(date(i64::MIN, Style::Postgres).len() > 10, "no overflow");
        assert!(ts(Unit::Millis, i64::MAX).ends_with('Z'));
        assert!(ts(Unit::Nanos, i64::MIN).ends_with('Z'));
        assert_eq!(date(2_932_896, Style::Postgres), "9999-12-31");
        assert_eq!(date(2_932_897, Style::Postgres), "10000-01-01");
        assert_eq!(date(2_932_897, Style::Iso), "+10000-01-01");
        assert_eq!(date(11_016, Style::Iso), "2000-02-29");
    }
}
