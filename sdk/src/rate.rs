//! Rate limits across every worker of a queue, on JetStream: a queue with a `rateLimit` of R
//! jobs per second has a tokens stream (work-queue retention, at most R tokens stored) that one
//! issuer (the operator) fills at R tokens per second; a worker takes one token per job it
//! starts, from the shared durable consumer `rate`. The server hands each token to one worker
//! only, so however many workers there are, the jobs started in any one-second window are at
//! most the R tokens the stream may hold at its start (saved while the queue was idle) plus the
//! tokens issued during it, at most R × 1.15 + 1 ([`tokens_due`]): 2.15 R + 1 after an idle
//! spell, 1.15 R + 1 under steady load, R on average over longer spans. A loaded issuer
//! issues fewer tokens, never more.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::names::QueueRef;

/// How often the issuer adds tokens.
pub const ISSUE_INTERVAL: Duration = Duration::from_millis(100);

/// Most time one issue accounts for: a tick that comes late (a loaded operator) adds at most
/// this much worth of tokens, never a catch-up burst.
pub const MAX_ACCRUAL: Duration = Duration::from_millis(150);

/// Tokens due after `elapsed` (counted up to [`MAX_ACCRUAL`]) at `per_second`, with `carry` the
/// fraction left from before; returns the whole tokens to add now and the new carry. So the
/// tokens issued in any window of length `w` are at most `per_second × (w + MAX_ACCRUAL)` plus
/// one for the carry, however late the ticks come.
pub fn tokens_due(per_second: u32, elapsed: Duration, carry: f64) -> (u64, f64) {
    let elapsed = elapsed.min(MAX_ACCRUAL);
    let due = f64::from(per_second) * elapsed.as_secs_f64() + carry;
    let whole = due.floor();
    // `whole` is non-negative and at most per_second × 0.15 + 1.
    (whole as u64, due - whole)
}

/// Adds tokens to `queue`'s tokens stream at `per_second` until `stop` is cancelled.
pub async fn issue(
    nats: async_nats::Client,
    queue: QueueRef,
    per_second: u32,
    stop: CancellationToken,
) {
    let subject = queue.tokens_subject();
    let mut ticker = tokio::time::interval(ISSUE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    let mut carry = 0.0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let (count, rest) = tokens_due(per_second, now - last, carry);
        (last, carry) = (now, rest);
        for _ in 0..count {
            if let Err(error) = nats.publish(subject.clone(), bytes::Bytes::new()).await {
                warn!(%error, queue = %queue.stream(), "issuing rate-limit tokens");
                break;
            }
        }
    }
}

/// A worker's access to its queue's tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    consumer: consumer::PullConsumer,
}

impl Tokens {
    /// Binds to the queue's tokens stream, creating the shared consumer if needed.
    pub async fn bind(js: &jetstream::Context, queue: &QueueRef) -> Result<Self, String> {
        let stream = js
            .get_stream(queue.tokens_stream())
            .await
            .map_err(|e| format!("looking up stream {}: {e}", queue.tokens_stream()))?;
        let consumer = stream
            .get_or_create_consumer(
                queue.tokens_consumer(),
                consumer::pull::Config {
                    durable_name: Some(queue.tokens_consumer().to_owned()),
                    // Work-queue streams need explicit acks; a token is acked as it is taken.
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("binding to the rate-limit tokens: {e}"))?;
        Ok(Self { consumer })
    }

    /// Takes up to `wanted` tokens: what is there now, or else waits up to `wait` for one.
    /// Returns how many it got (0 when `wait` passed without one).
    pub async fn take(&self, wanted: usize, wait: Duration) -> Result<usize, String> {
        let failed = |e: consumer::pull::BatchError| format!("taking rate-limit tokens: {e}");
        let now = self
            .consumer
            .fetch()
            .max_messages(wanted)
            .messages()
            .await
            .map_err(failed)?;
        let got = count(now).await;
        if got > 0 {
            return Ok(got);
        }
        let one = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(failed)?;
        Ok(count(one).await)
    }
}

/// Tokens delivered by one pull request.
async fn count(mut batch: consumer::pull::Batch) -> usize {
    let mut got = 0;
    while let Some(token) = batch.next().await {
        match token {
            Ok(token) => {
                if let Err(error) = token.ack().await {
                    warn!(%error, "acking a rate-limit token");
                }
                got += 1;
            }
            Err(error) => {
                warn!(%error, "taking rate-limit tokens");
                break;
            }
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accrue_by_elapsed_time_and_carry_fractions() {
        let tick = Duration::from_millis(100);
        assert_eq!(tokens_due(100, tick, 0.0), (10, 0.0));
        // 5/s: half a token per tick, one every second tick.
        let (n, carry) = tokens_due(5, tick, 0.0);
        assert_eq!((n, carry), (0, 0.5));
        assert_eq!(tokens_due(5, tick, carry), (1, 0.0));
        // A late tick adds at most 150 ms worth: no catch-up burst after a pause.
        assert_eq!(tokens_due(100, Duration::from_secs(10), 0.0).0, 15);
        assert_eq!(tokens_due(100, Duration::from_millis(120), 0.0).0, 12);
    }
}
