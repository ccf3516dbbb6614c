//! Turns what the user typed or piped into the jobs `conveyor submit` publishes: one payload from
//! an argument, a file or stdin, the same payload many times (`--count`), or one job per line of
//! a JSON Lines file (`--jsonl`).
//!
//! Input is hostile until checked: every read is bounded ([`MAX_PAYLOAD`]), jobs are produced
//! lazily so a submission holds a window of them, not all, and a JSON Lines file is checked
//! whole before its first job is sent ([`Jsonl::open`]). A line without an id gets one derived
//! from its number and its bytes ([`derived_id`]), so submitting the same file again — after an
//! interruption, or after fixing a refused line — is deduplicated by JetStream line by line.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use serde_json::Value;

/// Largest payload (and JSON Lines line) read: 64 MiB, the most a NATS server can be set to take
/// in one message, so anything larger could never be sent anyway.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Most lines of a JSON Lines input (blank ones included), as many as `--count` allows jobs: a
/// submission that ends, and an endless stdin that is refused rather than kept.
pub const MAX_LINES: u64 = 1_000_000;

/// One job to submit: an optional caller-chosen id (the idempotency key) and the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// Job id; `None` lets the client pick a fresh one.
    pub id: Option<String>,
    /// Opaque payload bytes handed to the worker as they are (cheap to clone).
    pub payload: Bytes,
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

/// Reads the payload of a single-payload submission, at most [`MAX_PAYLOAD`] bytes.
pub fn read_payload(source: PayloadSource<'_>) -> anyhow::Result<Bytes> {
    let bytes = match source {
        PayloadSource::Argument(s) => s.as_bytes().to_vec(),
        PayloadSource::File(p) if p == Path::new("-") => read_stdin()?,
        PayloadSource::File(p) => {
            let file = File::open(p)
                .with_context(|| format!("cannot read payload file {}", p.display()))?;
            read_bounded(file, &format!("payload file {}", p.display()))?
        }
        PayloadSource::Stdin => {
            if std::io::stdin().is_terminal() {
                bail!(
                    "no payload given: pass it as an argument, with --file, with --jsonl, or pipe it on stdin"
                );
            }
            read_stdin()?
        }
    };
    Ok(Bytes::from(bytes))
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    read_bounded(std::io::stdin().lock(), "the payload on stdin")
}

/// Reads all of `reader` unless it holds more than [`MAX_PAYLOAD`] bytes.
fn read_bounded(reader: impl Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    reader
        .take(MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {what}"))?;
    if buf.len() > MAX_PAYLOAD {
        bail!("{what} is larger than 64 MiB, more than NATS takes in one message");
    }
    Ok(buf)
}

/// The jobs of a `--count N` submission, made one at a time: the same payload (shared, not
/// copied) `count` times. With an explicit id, the jobs get `<id>-1` … `<id>-N` so they stay
/// distinct and idempotent across re-runs.
pub fn repeated(
    payload: Bytes,
    id: Option<String>,
    count: u64,
) -> impl Iterator<Item = JobInput> + Send {
    (1..=count).map(move |i| JobInput {
        id: id.as_ref().map(|id| match count {
            1 => id.clone(),
            _ => format!("{id}-{i}"),
        }),
        payload: payload.clone(),
    })
}

/// A JSON Lines file of jobs whose every line was checked. Stdin is kept in an anonymous
/// temporary file while it is checked, so it can be read a second time, like a file, to send.
#[derive(Debug)]
pub struct Jsonl {
    /// The file's name as given, or `stdin`, for messages.
    name: String,
    /// The file (or the copy of stdin), to read again from the start.
    file: File,
    /// Jobs the check found.
    jobs: u64,
}

impl Jsonl {
    /// Reads and checks the whole file (`-` for stdin) without keeping it in memory; the first
    /// bad line is an error that names the file and the line, and nothing is sent.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (name, mut file, jobs) = if path == Path::new("-") {
            let mut copy = tempfile::tempfile().context("cannot create a file to hold stdin")?;
            let tee = Tee {
                from: std::io::stdin().lock(),
                to: &mut copy,
            };
            let jobs = check(BufReader::new(tee), "stdin")?;
            ("stdin".to_owned(), copy, jobs)
        } else {
            let name = path.display().to_string();
            let file =
                File::open(path).with_context(|| format!("cannot open JSON Lines file {name}"))?;
            let jobs = check(BufReader::new(&file), &name)?;
            (name, file, jobs)
        };
        if jobs == 0 {
            bail!("{name}: no jobs: the input has no non-blank line");
        }
        file.rewind()
            .with_context(|| format!("cannot read {name} again"))?;
        Ok(Self { name, file, jobs })
    }

    /// The jobs, read from the file again line by line. Should the file have changed since
    /// [`Jsonl::open`] checked it, the bad line or count ends the jobs with an error.
    pub fn jobs(self) -> impl Iterator<Item = anyhow::Result<JobInput>> + Send {
        let Jsonl { name, file, jobs } = self;
        let mut lines = Lines::new(BufReader::new(file));
        let (mut seen, mut done) = (0u64, false);
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let changed = |e: anyhow::Error| {
                anyhow!("{name}: {e:#} (the file changed while it was being submitted)")
            };
            loop {
                let line = match lines.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) if seen == jobs => return None,
                    Ok(None) => {
                        done = true;
                        return Some(Err(changed(anyhow!("{seen} jobs, not {jobs}"))));
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(changed(e)));
                    }
                };
                match parse_line(line.1, line.0) {
                    Ok(Some(_)) if seen == jobs => {
                        done = true;
                        return Some(Err(changed(anyhow!("more than {jobs} jobs"))));
                    }
                    Ok(Some(job)) => {
                        seen += 1;
                        return Some(Ok(job));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        done = true;
                        return Some(Err(changed(anyhow!("line {}: {e}", line.0))));
                    }
                }
            }
        })
    }
}

/// Checks every line of `reader`; returns how many jobs it holds.
fn check(reader: impl BufRead, name: &str) -> anyhow::Result<u64> {
    let refuse = |e: String| anyhow!("{name}: {e} (nothing was submitted)");
    let mut lines = Lines::new(reader);
    let mut jobs = 0u64;
    loop {
        let (lineno, line) = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(jobs),
            Err(e) => return Err(refuse(format!("{e:#}"))),
        };
        match parse_line(line, lineno) {
            Ok(Some(_)) => jobs += 1,
            Ok(None) => {}
            Err(e) => return Err(refuse(format!("line {lineno}: {e}"))),
        }
    }
}

/// Copies what it reads from `from` to `to`.
struct Tee<R, W> {
    from: R,
    to: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.from.read(buf)?;
        self.to.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The lines of a reader as bytes, numbered from 1, each without its terminator (`\n` or
/// `\r\n`), and without the UTF-8 byte order mark that may start the first. A line longer than
/// [`MAX_PAYLOAD`] is an error, found without reading it whole, and so is a line past
/// [`MAX_LINES`].
struct Lines<R> {
    reader: R,
    lineno: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            lineno: 0,
            buf: Vec::new(),
        }
    }

    fn next_line(&mut self) -> anyhow::Result<Option<(u64, &[u8])>> {
        self.buf.clear();
        let lineno = self.lineno + 1;
        let read = (&mut self.reader)
            .take(MAX_PAYLOAD as u64 + 2)
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("cannot read line {lineno}"))?;
        if read == 0 {
            return Ok(None);
        }
        if lineno > MAX_LINES {
            bail!("more than {MAX_LINES} lines; split the input");
        }
        self.lineno = lineno;
        let mut line = self.buf.as_slice();
        if let Some(rest) = line.strip_suffix(b"\n") {
            line = rest.strip_suffix(b"\r").unwrap_or(rest);
        }
        if line.len() > MAX_PAYLOAD {
            bail!("line {lineno} is longer than 64 MiB, more than NATS takes in one message");
        }
        if lineno == 1 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        Ok(Some((lineno, line)))
    }
}

/// The id of a JSON Lines job that names none: `jsonl-<line number>-<hash>`, where the hash is
/// the 128-bit FNV-1a of the line's bytes (without its terminator) in 32 lowercase hex digits.
/// The same line at the same place gets the same id in every run, so a re-run is deduplicated;
/// a changed line is a new job.
pub fn derived_id(lineno: u64, line: &[u8]) -> String {
    format!("jsonl-{lineno}-{:032x}", fnv1a_128(line))
}

/// FNV-1a, 128 bits: stable across processes and releases, unlike the std hasher.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    bytes.iter().fold(OFFSET, |hash, &b| {
        (hash ^ u128::from(b)).wrapping_mul(PRIME)
    })
}

/// One line as a job, or `None` for a blank line. A line that is an object with a `payload` key
/// and at most an `id` key besides is a wrapper `{"id": "...", "payload": ...}` (`id`
/// optional); any other line is the payload itself, byte for byte. A wrapper's payload that is a
/// JSON string is sent as the string's text; any other JSON value as compact JSON. Refused: a
/// line that is not UTF-8, a line starting with `{` that is not one JSON object, and a wrapper
/// whose id is not a valid job id.
fn parse_line(line: &[u8], lineno: u64) -> Result<Option<JobInput>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "not UTF-8 text at byte {} (JSON Lines files are UTF-8)",
            e.valid_up_to() + 1
        )
    })?;
    let raw = || JobInput {
        id: Some(derived_id(lineno, line)),
        payload: Bytes::copy_from_slice(line),
    };
    if !text.trim_start_matches([' ', '\t', '\r']).starts_with('{') {
        return Ok(Some(raw()));
    }
    let mut fields = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => return Ok(Some(raw())),
        Err(e) => {
            let said = e.to_string();
            let said = said
                .rsplit_once(" at line ")
                .map_or(said.as_str(), |(s, _)| s);
            return Err(format!(
                "starts with {{ but is not a JSON object: {said} at column {}",
                e.column()
            ));
        }
    };
    if !fields.contains_key("payload") || !fields.keys().all(|k| k == "id" || k == "payload") {
        return Ok(Some(raw()));
    }
    let id = match fields.remove("id") {
        None | Some(Value::Null) => derived_id(lineno, line),
        Some(Value::String(id)) => {
            conveyor::protocol::validate_id(&id).map_err(|e| format!("\"id\": {e}"))?;
            id
        }
        Some(other) => return Err(format!("\"id\" must be a non-empty string, got {other}")),
    };
    let payload = match fields.remove("payload") {
        Some(Value::String(s)) => s.into_bytes(),
        Some(other) => serde_json::to_vec(&other).map_err(|e| format!("\"payload\": {e}"))?,
        None => unreachable!("checked above"),
    };
    Ok(Some(JobInput {
        id: Some(id),
        payload: Bytes::from(payload),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<Vec<JobInput>> {
        let mut lines = Lines::new(s.as_bytes());
        let mut jobs = Vec::new();
        while let Some((lineno, line)) = lines.next_line()? {
            if let Some(job) =
                parse_line(line, lineno).map_err(|e| anyhow!("line {lineno}: {e}"))?
            {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    fn job(id: &str, payload: &str) -> JobInput {
        JobInput {
            id: Some(id.to_owned()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    fn payloads(jobs: &[JobInput]) -> Vec<&[u8]> {
        jobs.iter().map(|j| j.payload.as_ref()).collect()
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
                job("a", "{\"n\":1}"),
                job(&derived_id(3, b"{\"payload\":\"text\"}"), "text"),
                job(&derived_id(4, b"{\"id\":null,\"payload\":[1, 2]}"), "[1,2]")
            ]
        );
    }

    #[test]
    fn other_lines_are_payloads_byte_for_byte() {
        let input = "{\"n\": 1}\nplain text\n  42  \n\t{\"payload\":1,\"extra\":2} \r\n[1,\r\nlast \u{e9}\r";
        let jobs = parse(input).unwrap();
        assert_eq!(
            payloads(&jobs),
            [
                &b"{\"n\": 1}"[..],
                b"plain text",
                b"  42  ",
                b"\t{\"payload\":1,\"extra\":2} ",
                b"[1,",
                "last \u{e9}\r".as_bytes(),
            ]
        );
    }

    #[test]
    fn blank_lines_are_skipped_but_counted() {
        let jobs = parse("\u{feff}\n \t\r\n\nx\n").unwrap();
        assert_eq!(jobs, vec![job(&derived_id(4, b"x"), "x")]);
        // A byte order mark opens the first line only.
        let jobs = parse("\u{feff}{\"id\":\"b\",\"payload\":1}\n").unwrap();
        assert_eq!(jobs, vec![job("b", "1")]);
    }

    #[test]
    fn derived_ids_depend_on_line_number_and_bytes_only() {
        // Published FNV-1a 128 test vectors.
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a_128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
        assert_eq!(
            derived_id(7, b"a"),
            "jsonl-7-d228cb696f1a8caf78912b704e4a8964"
        );
        let first = parse("same\nsame\n").unwrap();
        assert_ne!(first[0].id, first[1].id, "two lines, two jobs");
        assert_eq!(
            parse("same\r\nsame\r\n").unwrap(),
            first,
            "CRLF or LF alike"
        );
        let prefix = parse("same\n").unwrap();
        assert_eq!(prefix[..], first[..1], "a re-run of a prefix dedups");
        let id = first[0].id.as_deref().unwrap();
        conveyor::protocol::validate_id(id).unwrap();
        assert!(derived_id(u64::MAX, &[0xff; 10]).len() <= conveyor::protocol::MAX_ID_LEN);
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        for (input, line, why) in [
            (
                "x\n{\"id\":7,\"payload\":1}\n",
                2,
                "\"id\" must be a non-empty string",
            ),
            ("{\"id\":\"\",\"payload\":1}", 1, "\"id\": job id is empty"),
            (
                "{\"id\":\"a b\",\"payload\":1}",
                1,
                "\"id\": job id \"a b\"",
            ),
            (
                "ok\n\n{\"id\":\"x\",\"payload\":",
                3,
                "starts with { but is not a JSON object: EOF while parsing a value at column",
            ),
            (
                "  {\"n\": 1} trailing",
                1,
                "starts with { but is not a JSON object: trailing characters at column 12",
            ),
        ] {
            let mut lines = Lines::new(input.as_bytes());
            let mut found = None;
            while let Some((lineno, text)) = lines.next_line().unwrap() {
                if let Err(e) = parse_line(text, lineno) {
                    found = Some((lineno, e));
                    break;
                }
            }
            let (lineno, e) = found.unwrap_or_else(|| panic!("{input:?} accepted"));
            assert_eq!(lineno, line, "{input:?}");
            assert!(e.starts_with(why), "{input:?}: {e}");
        }
        let err = parse_line(b"ok \xff\xfe{", 2).unwrap_err();
        assert!(err.starts_with("not UTF-8 text at byte 4"), "{err}");
    }

    #[test]
    fn lines_and_payloads_are_bounded() {
        let long = vec![b'x'; MAX_PAYLOAD + 1];
        let mut lines = Lines::new(long.as_slice());
        let err = lines.next_line().unwrap_err();
        assert!(format!("{err}").contains("line 1 is longer than 64 MiB"));
        let mut exact = vec![b'y'; MAX_PAYLOAD];
        exact.extend_from_slice(b"\r\nz");
        let mut lines = Lines::new(exact.as_slice());
        assert_eq!(lines.next_line().unwrap().unwrap().1.len(), MAX_PAYLOAD);
        assert_eq!(lines.next_line().unwrap().unwrap(), (2, &b"z"[..]));
        let many = "\n".repeat(MAX_LINES as usize) + "x\n";
        let mut lines = Lines::new(many.as_bytes());
        let err = loop {
            match lines.next_line() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{MAX_LINES} + 1 lines accepted"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.to_string(), "more than 1000000 lines; split the input");
        assert_eq!(lines.lineno, MAX_LINES);
        let err = read_bounded(long.as_slice(), "the payload").unwrap_err();
        assert!(format!("{err}").contains("larger than 64 MiB"));
        assert_eq!(read_bounded(&b"ok"[..], "the payload").unwrap(), b"ok");
    }

    #[test]
    fn a_file_is_checked_whole_then_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "a\n\n{\"id\":\"b\",\"payload\":2}\n").unwrap();
        let file = Jsonl::open(&path).unwrap();
        assert_eq!(file.jobs, 2);
        let jobs: Vec<_> = file.jobs().collect::<anyhow::Result<_>>().unwrap();
        assert_eq!(jobs, vec![job(&derived_id(1, b"a"), "a"), job("b", "2")]);

        std::fs::write(&path, "a\nb\n{\"payload\":\n").unwrap();
        let err = format!("{:#}", Jsonl::open(&path).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: line 3: starts with {{", path.display()))
                && err.ends_with("(nothing was submitted)"),
            "{err}"
        );
        std::fs::write(&path, "\n \n").unwrap();
        assert!(format!("{:#}", Jsonl::open(&path).unwrap_err()).contains("no jobs"));
    }

    #[test]
    fn a_file_changed_after_its_check_ends_the_jobs_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "a\nb\n").unwrap();
        let file = Jsonl::open(&path).unwrap();
        std::fs::write(&path, "a\n{\n").unwrap();
        let jobs: Vec<_> = file.jobs().collect();
        assert_eq!(jobs.len(), 2);
        assert!(jobs[0].is_ok());
        let err = format!("{:#}", jobs[1].as_ref().unwrap_err());
        assert!(err.contains("line 2") && err.contains("changed"), "{err}");

        std::fs::write(&path, "a\nb\n").unwrap();
        let file = Jsonl::open(&path).unwrap();
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        let jobs: Vec<_> = file.jobs().collect();
        assert_eq!(jobs.len(), 3);
        let err = format!("{:#}", jobs[2].as_ref().unwrap_err());
        assert!(
            err.contains("more than 2 jobs") && err.contains("changed"),
            "{err}"
        );
    }

    #[test]
    fn count_with_id_numbers_the_ids() {
        let payload = Bytes::from_static(b"p");
        let ids: Vec<_> = repeated(payload.clone(), Some("load".into()), 3)
            .map(|j| j.id.unwrap())
            .collect();
        assert_eq!(ids, ["load-1", "load-2", "load-3"]);
        assert_eq!(
            repeated(payload.clone(), Some("one".into()), 1).collect::<Vec<_>>(),
            vec![job("one", "p")]
        );
        assert!(repeated(payload.clone(), None, 2).all(|j| j.id.is_none()));
        // Made one at a time: a million is no allocation up front.
        assert_eq!(repeated(payload, None, 1_000_000).size_hint().0, 1_000_000);
    }
}
