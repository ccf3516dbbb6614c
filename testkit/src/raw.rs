//! A NATS publisher that speaks the protocol itself, for hostile-input tests: it sends header
//! blocks byte for byte (a bare CR, non-UTF-8, a missing version line), which no NATS client
//! library lets a caller do, and returns the server's answer to a JetStream publish as it came.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Longest wait for one answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// The inbox answers come back on.
const INBOX: &str = "_INBOX.rawpub";

/// What the server said to one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A JetStream answer (a `PubAck` or an API error) as JSON.
    Json(serde_json::Value),
    /// A status without a body, e.g. `503` (no responders: no stream takes the subject).
    Status(u16),
    /// The server refused the publish and closed the connection (`-ERR`).
    ProtocolError(String),
}

impl Answer {
    /// The stream sequence of a stored job.
    pub fn sequence(&self) -> Option<u64> {
        match self {
            Answer::Json(json) if json.get("error").is_none() => json.get("seq")?.as_u64(),
            _ => None,
        }
    }

    /// The JetStream error code of a refused publish.
    pub fn error_code(&self) -> Option<u64> {
        match self {
            Answer::Json(json) => json.get("error")?.get("err_code")?.as_u64(),
            _ => None,
        }
    }
}

/// One connection that publishes raw messages and reads their answers in turn.
#[derive(Debug)]
pub struct RawPublisher {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    sent: u64,
}

impl RawPublisher {
    /// Connects to `127.0.0.1:<port>` and subscribes to the answers.
    pub async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        let (read, writer) = stream.into_split();
        let mut this = Self {
            reader: BufReader::new(read),
            writer,
            sent: 0,
        };
        let info = this.line().await?;
        if !info.starts_with("INFO ") {
            bail!("expected INFO from the server, got {info:?}");
        }
        let connect = r#"{"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1,"name":"raw-publisher"}"#;
        this.writer
            .write_all(format!("CONNECT {connect}\r\nSUB {INBOX}.* 1\r\nPING\r\n").as_bytes())
            .await?;
        loop {
            let line = this.line().await?;
            if line == "PONG" {
                return Ok(this);
            }
            if line.starts_with("-ERR") {
                bail!("server refused the connection: {line}");
            }
        }
    }

    /// Publishes `payload` with the header block `headers` (sent as given; `None` publishes
    /// without headers) to `subject`, asking for a JetStream answer, and returns it.
    pub async fn publish(
        &mut self,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> anyhow::Result<Answer> {
        self.sent += 1;
        let reply = format!("{INBOX}.{}", self.sent);
        let mut frame = Vec::with_capacity(payload.len() + 256);
        match headers {
            Some(block) => {
                let total = block.len() + payload.len();
                frame.extend_from_slice(
                    format!("HPUB {subject} {reply} {} {total}\r\n", block.len()).as_bytes(),
                );
                frame.extend_from_slice(block);
            }
            None => {
                frame.extend_from_slice(
                    format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes(),
                );
            }
        }
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.writer.write_all(&frame).await?;
        tokio::time::timeout(ANSWER_DEADLINE, self.answer(&reply))
            .await
            .with_context(|| format!("no answer to the publish to {subject}"))?
    }

    /// Sends `payload` with the header block `headers` to `subject` without asking for an
    /// answer (a core NATS publish), and waits until the server has processed it.
    pub async fn send(
        &mut self,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 256);
        match headers {
            Some(block) => {
                let total = block.len() + payload.len();
                frame.extend_from_slice(
                    format!("HPUB {subject} {} {total}\r\n", block.len()).as_bytes(),
                );
                frame.extend_from_slice(block);
            }
            None => {
                frame.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
            }
        }
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\nPING\r\n");
        self.writer.write_all(&frame).await?;
        loop {
            let line = self.line().await?;
            if line == "PONG" {
                return Ok(());
            }
            if line.starts_with("-ERR") {
                bail!("server refused the publish: {line}");
            }
        }
    }

    /// Reads until the answer on `reply` arrives.
    async fn answer(&mut self, reply: &str) -> anyhow::Result<Answer> {
        loop {
            let line = self.line().await?;
            if line == "PING" {
                self.writer.write_all(b"PONG\r\n").await?;
                continue;
            }
            if let Some(error) = line.strip_prefix("-ERR") {
                return Ok(Answer::ProtocolError(error.trim().to_owned()));
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let (subject, header_len, total_len) = match parts.as_slice() {
                ["MSG", subject, _sid, len] => (*subject, 0, len.parse::<usize>()?),
                ["HMSG", subject, _sid, hlen, len] => {
                    (*subject, hlen.parse::<usize>()?, len.parse::<usize>()?)
                }
                _ => continue,
            };
            let mut body = vec![0; total_len + 2];
            self.reader.read_exact(&mut body).await?;
            if subject != reply {
                continue;
            }
            let (head, payload) = body[..total_len].split_at(header_len);
            if payload.is_empty() && header_len > 0 {
                let head = String::from_utf8_lossy(head);
                let status = head
                    .lines()
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok(Answer::Status(status));
            }
            return Ok(Answer::Json(serde_json::from_slice(payload).with_context(
                || format!("answer is not JSON: {}", String::from_utf8_lossy(payload)),
            )?));
        }
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let read = tokio::time::timeout(ANSWER_DEADLINE, self.reader.read_line(&mut line))
            .await
            .context("no line from the server in time")??;
        if read == 0 {
            bail!("the server closed the connection");
        }
        Ok(line.trim_end().to_owned())
    }
}
