//! Durations in specs are strings like `30s`, `5m` or `1h30m`: readable in YAML, checked by a
//! schema pattern at admission, and parsed with `humantime` by the operator.

use std::time::Duration;

/// Schema pattern of a duration field: one or more `<number><unit>` groups, units `ms`, `s`,
/// `m`, `h`, `d`. A subset of what `humantime` parses, so the API server never admits a value
/// the operator cannot read.
pub const PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";

/// A duration field that the schema pattern admitted but that still cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {value:?} in {field}: {source}")]
pub struct DurationError {
    /// The field path, e.g. `spec.timeout`.
    pub field: &'static str,
    /// The rejected value.
    pub value: String,
    /// Why `humantime` rejected it.
    pub source: humantime::DurationError,
}

/// Parses a duration field, naming the field in the error.
pub fn parse(field: &'static str, value: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(value).map_err(|source| DurationError {
        field,
        value: value.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_compact_units() {
        assert_eq!(parse("f", "30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("f", "1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("f", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("f", "2d").unwrap(), Duration::from_secs(2 * 86400));
    }

    #[test]
    fn names_the_field_on_error() {
        let err = parse("spec.timeout", "soon").unwrap_err();
        assert!(err.to_string().contains("spec.timeout"), "{err}");
    }
}
