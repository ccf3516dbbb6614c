//! NATS header blocks as raw bytes, decoded without the NATS client's parser.
//!
//! A header block on the wire is `NATS/1.0[ <status>[ <description>]]\r\n`, then one
//! `<name>: <value>\r\n` line per header, then `\r\n`. async-nats 0.51 panics in its connection
//! task on a value with a bare CR and drops the connection on a non-UTF-8 block, so whoever must
//! read a message that may be hostile (the dispatcher, the dead-letter tools) fetches it with
//! `$JS.API.STREAM.MSG.GET` (the header block comes base64-encoded inside a JSON answer) and
//! decodes it here: every byte sequence gives a [`HeaderBlock`] or a [`BlockError`], and every
//! header line that breaks the protocol's grammar is reported as a [`BadHeader`].

use async_nats::HeaderMap;

/// Largest header block JetStream stores (its length travels as 16 bits): a publish with more
/// is refused (error 10097), so a copy Conveyor writes must stay below it.
pub const MAX_BLOCK_BYTES: usize = 65_535;
/// Longest header name the protocol accepts, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// The first line of every header block.
const VERSION: &[u8] = b"NATS/1.0";

/// A header block that is not one at all (no `NATS/1.0` line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header block does not start with NATS/1.0")]
pub struct BlockError;

/// A header line that breaks the grammar: what it is, as far as it can be shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {name}: {problem}")]
pub struct BadHeader {
    /// The name, lossily decoded and cut to 64 characters (it may itself be the problem).
    pub name: String,
    /// What is wrong.
    pub problem: &'static str,
}

/// One decoded header block: the headers in order, the lines that broke the grammar, and the
/// raw bytes (for a copy that keeps them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderBlock {
    /// Well-formed headers, in the order they came.
    pub headers: Vec<(String, String)>,
    /// Lines that are not well-formed headers (dropped from `headers`).
    pub bad: Vec<BadHeader>,
}

impl HeaderBlock {
    /// Decodes a header block. Lines end with CRLF; a CR or LF anywhere else, a NUL, a
    /// non-UTF-8 byte, a name that is not 1–256 visible ASCII characters without `:`, or a line
    /// without `:` make that line a [`BadHeader`]. Only a block without the version line is an
    /// error. A status on the version line (`NATS/1.0 503`) is reported as bad too.
    pub fn decode(bytes: &[u8]) -> Result<Self, BlockError> {
        let mut lines = split_crlf(bytes);
        let first = lines.next().unwrap_or_default();
        if !first.starts_with(VERSION) {
            return Err(BlockError);
        }
        let mut block = HeaderBlock {
            headers: Vec::new(),
            bad: Vec::new(),
        };
        if !first[VERSION.len()..].iter().all(u8::is_ascii_whitespace) {
            // A status line is the server's (`NATS/1.0 408 …`); in a stored job it makes
            // the client take the job for a status message.
            block.bad.push(BadHeader {
                name: "NATS/1.0".into(),
                problem: "version line carries a status",
            });
        }
        for line in lines.filter(|line| !line.is_empty()) {
            match decode_line(line) {
                Ok(header) => block.headers.push(header),
                Err(bad) => block.bad.push(bad),
            }
        }
        Ok(block)
    }

    /// The well-formed headers as a client header map (values that the client could not carry
    /// are already in `bad`, so this never panics).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.append(name.as_str(), value.as_str());
        }
        map
    }
}

/// Splits on CRLF only: a bare CR or LF stays inside its line (and makes it bad).
fn split_crlf(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.windows(2).position(|w| w == b"\r\n") {
            Some(at) => {
                rest = Some(&current[at + 2..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn decode_line(line: &[u8]) -> Result<(String, String), BadHeader> {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(BadHeader {
            name: shown(line),
            problem: "is not a `name: value` line",
        });
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let bad = |problem| BadHeader {
        name: shown(name),
        problem,
    };
    check_name(name).map_err(bad)?;
    let value = std::str::from_utf8(value).map_err(|_| bad("value is not UTF-8"))?;
    check_value(value).map_err(bad)?;
    // Names are checked ASCII above.
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, value.trim().to_owned()))
}

/// A header name: 1–256 visible ASCII characters, no `:`.
pub fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("name is longer than 256 bytes");
    }
    if !name.iter().all(|b| b.is_ascii_graphic() && *b != b':') {
        return Err("name has a character other than visible ASCII");
    }
    Ok(())
}

/// A header value: no CR, LF or NUL (UTF-8 is given by the type).
pub fn check_value(value: &str) -> Result<(), &'static str> {
    if value.contains('\r') {
        return Err("value contains a CR");
    }
    if value.contains('\n') {
        return Err("value contains an LF");
    }
    if value.contains('\0') {
        return Err("value contains a NUL");
    }
    Ok(())
}

/// A name or line for an error message: lossy UTF-8, shown as [`shown_text`] shows text.
fn shown(bytes: &[u8]) -> String {
    shown_text(&String::from_utf8_lossy(bytes))
}

/// Text for an error message: control characters (and quotes, backslashes, non-ASCII) escaped,
/// at most 128 characters, then `…`.
pub(crate) fn shown_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(128)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().count() > 128 {
        out.push('…');
    }
    out
}

/// Bytes on the wire of a header map, as the client would write it (`NATS/1.0\r\n`, one line a
/// value, the final `\r\n`).
pub fn wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    VERSION.len() + 2 + lines + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_block_decodes_in_order() {
        let block =
            HeaderBlock::decode(b"NATS/1.0\r\nNats-Msg-Id: a\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n")
                .unwrap();
        assert!(block.bad.is_empty());
        assert_eq!(
            block.headers,
            vec![
                ("Nats-Msg-Id".into(), "a".into()),
                ("X-Two".into(), "1".into()),
                ("X-Two".into(), "2".into())
            ]
        );
        let map = block.header_map();
        assert_eq!(map.get_all("X-Two").count(), 2);
    }

    #[test]
    fn bad_lines_are_named_and_the_rest_kept() {
        let block = HeaderBlock::decode(
            b"NATS/1.0\r\nX-Note: line1\rline2\r\nX-Bin: \xff\xfe\r\nok: yes\r\nX-Nul: a\0b\r\nno colon\r\n: empty\r\n\r\n",
        )
        .unwrap();
        assert_eq!(block.headers, vec![("ok".into(), "yes".into())]);
        let problems: Vec<String> = block.bad.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "header X-Note: value contains a CR",
                "header X-Bin: value is not UTF-8",
                "header X-Nul: value contains a NUL",
                "header no colon: is not a `name: value` line",
                "header : name is empty",
            ]
        );
    }

    #[test]
    fn only_a_missing_version_line_is_an_error() {
        assert_eq!(HeaderBlock::decode(b""), Err(BlockError));
        assert_eq!(HeaderBlock::decode(b"HTTP/1.1\r\n\r\n"), Err(BlockError));
        let status = HeaderBlock::decode(b"NATS/1.0 408 Request Timeout\r\n\r\n").unwrap();
        assert!(status.headers.is_empty());
        assert_eq!(status.bad[0].problem, "version line carries a status");
        assert!(HeaderBlock::decode(b"NATS/1.0").unwrap().headers.is_empty());
    }

    #[test]
    fn wire_length_matches_the_client() {
        let mut map = HeaderMap::new();
        map.insert("Nats-Msg-Id", "abc");
        map.append("X", "1");
        map.append("X", "22");
        // NATS/1.0\r\n + "Nats-Msg-Id: abc\r\n" + "X: 1\r\n" + "X: 22\r\n" + \r\n
        assert_eq!(wire_len(&map), 10 + 18 + 6 + 7 + 2);
    }
}
