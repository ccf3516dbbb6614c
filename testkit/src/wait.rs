//! Waits on conditions with deadlines, never fixed sleeps: each says what it waited for, so a
//! test that times out tells why.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `condition` returns true, checking every 20 ms, for at most `deadline`.
///
/// `what` says what the caller waits for; it ends up in the error so a failing test tells why.
pub async fn wait_for<F, Fut>(
    deadline: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_some(deadline, what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Waits until `check` returns `Some`, checking every 20 ms, for at most `deadline`, and
/// returns what it found: the value that met the condition, not a second read that may not.
pub async fn wait_for_some<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Takes `n` jobs from `consumer` as a worker would (pull requests that wait up to a second
/// each), without acking them, for at most `deadline`. A no-wait fetch comes back empty when
/// the consumer has not caught up with a publish yet, as on a busy machine; this does not.
pub async fn take(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    n: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<async_nats::jetstream::Message>> {
    use futures::StreamExt as _;
    let start = Instant::now();
    let mut taken = Vec::with_capacity(n);
    while taken.len() < n {
        if start.elapsed() >= deadline {
            bail!("took {} of {n} jobs in {deadline:?}", taken.len());
        }
        let mut batch = consumer
            .batch()
            .max_messages(n - taken.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("pull request: {e}"))?;
        while let Some(message) = batch.next().await {
            taken.push(message.map_err(|e| anyhow::anyhow!("pulled: {e}"))?);
        }
    }
    Ok(taken)
}
