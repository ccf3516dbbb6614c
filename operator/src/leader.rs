//! Leader election on a `coordination.k8s.io/v1` Lease, so several operator replicas can run
//! and only one reconciles. The holder renews the Lease every third of its duration; a
//! standby takes it over once it has not been renewed for a whole duration. Every write is a
//! replace guarded by the `resourceVersion` that was read, so two candidates never both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Who may hold the Lease right now, from its spec alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// We hold it.
    Ours,
    /// Nobody holds it, or the holder let it expire.
    Free,
    /// Someone else holds it.
    Held,
}

/// Judges a Lease spec at `now` for candidate `me`.
pub fn judge(spec: &LeaseSpec, me: &str, now: Timestamp) -> Verdict {
    let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
        return Verdict::Free;
    };
    if holder == me {
        return Verdict::Ours;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match &spec.renew_time {
        Some(MicroTime(renewed)) if *renewed + duration > now => Verdict::Held,
        _ => Verdict::Free,
    }
}

/// One candidate for one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

impl Elector {
    /// A candidate named `identity` for the Lease `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Creates, renews or takes over the Lease if allowed; true when we hold it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(err) if is_conflict(&err) => Ok(false),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        match judge(&spec, &self.identity, now) {
            Verdict::Held => return Ok(false),
            Verdict::Ours => {
                let mut renewed = spec;
                renewed.renew_time = Some(MicroTime(now));
                lease.spec = Some(renewed);
            }
            Verdict::Free => {
                lease.spec = Some(self.spec(now, spec.lease_transitions.unwrap_or(0) + 1));
            }
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if is_conflict(&err) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the Lease up (if we hold it) so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(err) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(%err, "cannot release the leader lease");
        }
    }

    /// Keeps trying to acquire and renew the Lease until `stop` is cancelled, publishing
    /// whether we lead on `leading`. Leadership is considered lost when the Lease could not be
    /// renewed for two thirds of its duration, before anyone else may take it.
    pub async fn run(self, leading: watch::Sender<bool>, stop: CancellationToken) {
        let period = (self.duration / 3).max(Duration::from_millis(200));
        let mut last_renewal: Option<Instant> = None;
        loop {
            let held = match self.try_acquire().await {
                Ok(held) => held,
                Err(err) => {
                    tracing::warn!(%err, lease = %self.name, "leader election request failed");
                    last_renewal.is_some_and(|t| t.elapsed() < self.duration * 2 / 3)
                }
            };
            if held {
                last_renewal = Some(Instant::now());
            } else {
                last_renewal = None;
            }
            leading.send_if_modified(|was| {
                let changed = *was != held;
                *was = held;
                changed
            });
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
        }
        if *leading.borrow() {
            self.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> (LeaseSpec, Timestamp) {
        let now = Timestamp::from_second(1_000).unwrap();
        let spec = LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        };
        (spec, now)
    }

    #[test]
    fn empty_lease_is_free() {
        let (s, now) = spec(None, 0, 15);
        assert_eq!(judge(&s, "me", now), Verdict::Free);
    }

    #[test]
    fn own_lease_is_ours_even_when_late() {
        let (s, now) = spec(Some("me"), 100, 15);
        assert_eq!(judge(&s, "me", now), Verdict::Ours);
    }

    #[test]
    fn fresh_foreign_lease_is_held() {
        let (s, now) = spec(Some("other"), 5, 15);
        assert_eq!(judge(&s, "me", now), Verdict::Held);
    }

    #[test]
    fn expired_foreign_lease_is_free() {
        let (s, now) = spec(Some("other"), 16, 15);
        assert_eq!(judge(&s, "me", now), Verdict::Free);
    }
}
