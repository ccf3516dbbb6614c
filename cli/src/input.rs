//! Turns what the user typed or piped into the jobs `conveyor submit` publishes: one payload from
//! an argument, a file or stdin, the same payload many times (`--count`), or one job per line of
//! a JSON Lines file (`--jsonl`).

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

/// One job to submit: an optional caller-chosen id (the idempotency key) and the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// Job id; `None` lets the client pick a fresh one.
    pub id: Option<String>,
    /// Opaque payload bytes handed to the worker as they are.
    pub payload: Vec<u8>,
}

/// Where the payload of a single-payload submission comes from.
#[derive(Debug, Clone, Copy)]
pub enum PayloadSource<'a> {
    /// The payload was given on the command line.
    Argument(&'a str),
    /// Read the payload from a file; `-` means stdin.
    File(&'a Path),
    /// Read the payload from stdin, which must not be a terminal.
    Stdin,
}

/// Reads the payload of a single-payload submission.
pub fn read_payload(source: PayloadSource<'_>) -> anyhow::Result<Vec<u8>> {
    match source {
        PayloadSource::Argument(s) => Ok(s.as_bytes().to_vec()),
        PayloadSource::File(p) if p == Path::new("-") => read_stdin(),
        PayloadSource::File(p) => {
            std::fs::read(p).with_context(|| format!("cannot read payload file {}", p.display()))
        }
        PayloadSource::Stdin => {
            if std::io::stdin().is_terminal() {
                bail!(
                    "no payload given: pass it as an argument, with --file, with --jsonl, or pipe it on stdin"
                );
            }
            read_stdin()
        }
    }
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("cannot read the payload from stdin")?;
    Ok(buf)
}

/// The jobs of a `--count N` submission: the same payload `count` times. With an explicit id,
/// the jobs get `<id>-1` … `<id>-N` so they stay distinct and idempotent across re-runs.
pub fn repeated(payload: Vec<u8>, id: Option<&str>, count: u64) -> Vec<JobInput> {
    match (id, count) {
        (id, 1) => vec![JobInput {
            id: id.map(str::to_owned),
            payload,
        }],
        (id, n) => (1..=n)
            .map(|i| JobInput {
                id: id.map(|id| format!("{id}-{i}")),
                payload: payload.clone(),
            })
            .collect(),
    }
}

/// Reads a JSON Lines file (`-` for stdin) of jobs.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<JobInput>> {
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open JSON Lines file {}", path.display()))?;
        Box::new(BufReader::new(file))
    };
    parse_jsonl(reader).with_context(|| format!("in {}", path.display()))
}

/// Parses JSON Lines of jobs. Each non-blank line is either a wrapper object
/// `{"id": "...", "payload": ...}` (`id` optional) or, when it is anything else, the payload
/// itself, taken byte for byte. A wrapper's payload that is a JSON string is sent as the
/// string's text; any other JSON value is sent as compact JSON.
pub fn parse_jsonl(reader: impl BufRead) -> anyhow::Result<Vec<JobInput>> {
    let mut jobs = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let lineno = index + 1;
        let line = line.with_context(|| format!("cannot read line {lineno}"))?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let job = parse_line(trimmed).with_context(|| format!("line {lineno}"))?;
        jobs.push(job);
    }
    if jobs.is_empty() {
        bail!("no jobs: the input has no non-blank line");
    }
    Ok(jobs)
}

fn parse_line(line: &str) -> anyhow::Result<JobInput> {
    let raw = || JobInput {
        id: None,
        payload: line.as_bytes().to_vec(),
    };
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(line) else {
        return Ok(raw());
    };
    if !fields.keys().all(|k| k == "id" || k == "payload") {
        return Ok(raw());
    }
    let Some(payload) = fields.remove("payload") else {
        return Ok(raw());
    };
    let id = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() => Some(id),
        Some(other) => bail!("\"id\" must be a non-empty string, got {other}"),
    };
    let payload = match payload {
        Value::String(s) => s.into_bytes(),
        other => serde_json::to_vec(&other).context("cannot encode the payload")?,
    };
    Ok(JobInput { id, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<Vec<JobInput>> {
        parse_jsonl(s.as_bytes())
    }

    fn job(id: Option<&str>, payload: &str) -> JobInput {
        JobInput {
            id: id.map(str::to_owned),
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn wrapper_lines_carry_id_and_payload() {
        let jobs = parse(
            "{\"id\":\"a\",\"payload\":{\"n\":1}}\n\n{\"payload\":\"text\"}\n{\"id\":null,\"payload\":[1, 2]}\n",
        )
        .unwrap();
        assert_eq!(
            jobs,
            vec![
                job(Some("a"), "{\"n\":1}"),
                job(None, "text"),
                job(None, "[1,2]")
            ]
        );
    }

    #[test]
    fn other_lines_are_payloads_byte_for_byte() {
        let jobs = parse("{\"n\": 1}\nplain text\n  42  \n{\"payload\":1,\"extra\":2}\n").unwrap();
        assert_eq!(
            jobs,
            vec![
                job(None, "{\"n\": 1}"),
                job(None, "plain text"),
                job(None, "42"),
                job(None, "{\"payload\":1,\"extra\":2}"),
            ]
        );
    }

    #[test]
    fn bad_id_names_the_line() {
        let err = parse("x\n{\"id\":7,\"payload\":1}\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("line 2") && msg.contains("\"id\" must be a non-empty string"),
            "{msg}"
        );
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(parse("\n  \n").is_err());
    }

    #[test]
    fn count_with_id_numbers_the_ids() {
        let jobs = repeated(b"p".to_vec(), Some("load"), 3);
        let ids: Vec<_> = jobs.iter().map(|j| j.id.as_deref().unwrap()).collect();
        assert_eq!(ids, ["load-1", "load-2", "load-3"]);
        assert_eq!(
            repeated(b"p".to_vec(), Some("one"), 1),
            vec![job(Some("one"), "p")]
        );
        assert!(
            repeated(b"p".to_vec(), None, 2)
                .iter()
                .all(|j| j.id.is_none())
        );
    }
}
