//! Durations in specs are strings like `30s`, `5m`, `1h30m` or `7d`: readable in YAML, bounded
//! per field at admission (schema pattern and length, plus a CEL rule with the field's range),
//! and parsed again here with the same range, so a value that reached the operator some other
//! way (e.g. stored before the bounds existed) is refused with a clear error instead of
//! overflowing a nanosecond count further down.

use std::time::Duration;

use kube::core::{Message, Rule};

/// Schema pattern of a duration field: `<number><unit>` groups in the order `d`, `h`, `m`, `s`,
/// `ms`, each at most once, with at most 4, 5, 6, 8 and 10 digits. The digit limits keep every
/// admitted value far below the 292 years a signed nanosecond count holds, so neither the CEL
/// rule (Go's `time.ParseDuration`) nor the operator can overflow on a value the pattern admits.
pub const PATTERN: &str =
    "^([0-9]{1,4}d)?([0-9]{1,5}h)?([0-9]{1,6}m)?([0-9]{1,8}s)?([0-9]{1,10}ms)?$";

/// `minLength` of a duration field: the pattern alone admits the empty string.
pub const MIN_LENGTH: u32 = 2;

/// `maxLength` of a duration field: the longest string the pattern admits. The API server needs
/// it to bound the cost of the CEL rule.
pub const MAX_LENGTH: u32 = 39;

/// The range of one duration field, e.g. `1s` to `24h`, written in the field's own syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Shortest value accepted.
    pub min: &'static str,
    /// Longest value accepted.
    pub max: &'static str,
}

impl Bounds {
    /// The bounds `min..=max` (both in the field syntax; checked by the crate's tests).
    pub const fn new(min: &'static str, max: &'static str) -> Self {
        Self { min, max }
    }

    /// The shortest value as a duration.
    pub fn min(&self) -> Duration {
        syntax(self.min).expect("bounds are valid durations")
    }

    /// The longest value as a duration.
    pub fn max(&self) -> Duration {
        syntax(self.max).expect("bounds are valid durations")
    }

    /// `from 1s to 24h`, as error messages and schema descriptions say it.
    pub fn range(&self) -> String {
        format!("from {} to {}", self.min, self.max)
    }

    /// The CEL rule that holds the field to these bounds, with the message
    /// `<field> must be a duration from <min> to <max> (…)`.
    ///
    /// Kubernetes' `duration()` takes Go syntax only, without days, so the rule reads a leading
    /// `<n>d` with `int()` and the rest with `duration()`, and compares milliseconds. It only
    /// judges non-empty strings the pattern admits: the schema reports the others, and the API
    /// server still evaluates rules after a pattern or `minLength` violation (only type,
    /// required, enum and `maxLength` violations stop it). So it never fails at runtime: `int()` sees at most 4 digits, `duration()` a valid Go duration and the sum
    /// stays below 10^13. It concatenates no strings and only calls functions on `self` and
    /// its substrings, whose size the API server bounds by `maxLength` when it estimates the
    /// rule's cost.
    pub fn rule(&self, field: &str) -> Rule {
        let ms = "(self.contains('d') ? int(self.substring(0, self.indexOf('d'))) * 86400000 + (self.endsWith('d') ? 0 : duration(self.substring(self.indexOf('d') + 1)).getMilliseconds()) : duration(self).getMilliseconds())";
        let mut checks = Vec::new();
        if !self.min().is_zero() {
            checks.push(format!("{ms} >= {}", self.min().as_millis()));
        }
        checks.push(format!("{ms} <= {}", self.max().as_millis()));
        Rule::new(format!(
            "self == '' || !self.matches('{PATTERN}') || ({})",
            checks.join(" && ")
        ))
        .message(Message::Message(format!(
            "{field} must be a duration {} (units d, h, m, s, ms in that order, e.g. 1h30m)",
            self.range()
        )))
    }
}

/// A duration field that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    /// The value is not in the duration syntax.
    #[error(
        "invalid duration {value:?} in {field}: {reason} (expected <number><unit> groups, units d, h, m, s, ms in that order, e.g. 1h30m)"
    )]
    Invalid {
        /// The field path, e.g. `spec.timeout`.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The value is outside the field's range.
    #[error("{field} is {value}, out of range: must be a duration {range}")]
    OutOfRange {
        /// The field path, e.g. `spec.timeout`.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// The accepted range, e.g. `from 1s to 24h`.
        range: String,
    },
}

/// Parses a duration field and checks it against the field's bounds, naming the field in the
/// error.
pub fn parse(field: &'static str, value: &str, bounds: Bounds) -> Result<Duration, DurationError> {
    let d = syntax(value).map_err(|reason| DurationError::Invalid {
        field,
        value: value.to_owned(),
        reason,
    })?;
    if d < bounds.min() || d > bounds.max() {
        return Err(DurationError::OutOfRange {
            field,
            value: value.to_owned(),
            range: bounds.range(),
        });
    }
    Ok(d)
}

/// Reads the syntax of [`PATTERN`]; the reason when it does not match.
fn syntax(value: &str) -> Result<Duration, &'static str> {
    // (unit, milliseconds, most digits), in the order the units must appear.
    const UNITS: [(&str, u64, usize); 5] = [
        ("d", 86_400_000, 4),
        ("h", 3_600_000, 5),
        ("m", 60_000, 6),
        ("s", 1_000, 8),
        ("ms", 1, 10),
    ];
    if value.is_empty() {
        return Err("empty");
    }
    let mut rest = value;
    let mut next = 0; // index into UNITS of the next unit allowed
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("a unit without a number");
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_lowercase).count();
        let (unit, after) = after.split_at(unit_len);
        let Some(pos) = UNITS.iter().position(|(u, _, _)| *u == unit) else {
            return Err(if unit.is_empty() {
                "a number without a unit"
            } else {
                "an unknown unit"
            });
        };
        if pos < next {
            return Err("units out of order or repeated");
        }
        let (_, ms, max_digits) = UNITS[pos];
        if digits > max_digits {
            return Err("too many digits");
        }
        // At most 10 digits times at most a day in milliseconds: no overflow in u64.
        let n: u64 = number.parse().map_err(|_| "too many digits")?;
        total += n * ms;
        next = pos + 1;
        rest = after;
    }
    Ok(Duration::from_millis(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: Bounds = Bounds::new("0s", "3650d");

    #[test]
    fn parses_compact_units() {
        assert_eq!(parse("f", "30s", WIDE).unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse("f", "1h30m", WIDE).unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse("f", "250ms", WIDE).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse("f", "2d", WIDE).unwrap(),
            Duration::from_secs(2 * 86400)
        );
        assert_eq!(
            parse("f", "1d2h3m4s5ms", WIDE).unwrap(),
            Duration::from_millis(((86_400 + 7_200 + 180 + 4) * 1000) + 5)
        );
    }

    #[test]
    fn names_the_field_on_error() {
        let err = parse("spec.timeout", "soon", WIDE).unwrap_err();
        assert!(err.to_string().contains("spec.timeout"), "{err}");
    }

    #[test]
    fn refuses_what_the_pattern_refuses() {
        // crds/tests/cel_rules.rs checks the same strings against PATTERN itself.
        for bad in [
            "", "5", "s", "1h1d", "1s1s", "30m1h", "1w", "1.5h", "-1s", "99999d", "1 s", "1S",
        ] {
            assert!(syntax(bad).is_err(), "{bad:?} parsed");
        }
        let longest = "9999d99999h999999m99999999s9999999999ms";
        assert_eq!(longest.len(), MAX_LENGTH as usize);
        for good in ["0s", "1d", "500ms", longest] {
            assert!(syntax(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn refuses_values_out_of_range_with_the_range() {
        let timeout = Bounds::new("1s", "24h");
        let err = parse("spec.timeout", "200000d", timeout).unwrap_err();
        assert!(matches!(err, DurationError::Invalid { .. }), "{err}");
        let err = parse("spec.timeout", "2d", timeout).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.timeout is 2d, out of range: must be a duration from 1s to 24h"
        );
        let err = parse("spec.timeout", "0s", timeout).unwrap_err();
        assert!(err.to_string().contains("from 1s to 24h"), "{err}");
        assert_eq!(
            parse("spec.timeout", "24h", timeout).unwrap(),
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn rules_compare_milliseconds_and_skip_a_zero_minimum() {
        let rule = serde_json::to_value(Bounds::new("0s", "24h").rule("x")).unwrap();
        let text = rule["rule"].as_str().unwrap();
        assert!(!text.contains(">="), "{text}");
        assert!(text.ends_with("<= 86400000)"), "{text}");
        assert_eq!(
            rule["message"],
            "x must be a duration from 0s to 24h (units d, h, m, s, ms in that order, e.g. 1h30m)"
        );
        let rule = serde_json::to_value(Bounds::new("1ms", "3650d").rule("x")).unwrap();
        let text = rule["rule"].as_str().unwrap();
        assert!(
            text.contains(">= 1 &&") && text.ends_with("<= 315360000000)"),
            "{text}"
        );
    }
}
