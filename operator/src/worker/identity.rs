//! The identity step of a Worker's reconcile: when the operator is given an account signing
//! key (`--nats-signing-key-dir`), every Worker's pods connect to NATS with a user JWT of their
//! own, signed here, that may work the Worker's queue and nothing else
//! ([`conveyor::permissions::worker`]; docs/security.md, "Scoped identities").
//!
//! The identity is a `.creds` file in the Secret `<worker>-nats-creds` of the Worker's
//! namespace (owned by the Worker, so it goes with it), mounted into the pods in place of the
//! queue's credentials Secret. It is signed again once half its lifetime has passed, or when
//! the permissions it needs changed (the queue's priority levels or rate limit), or when the
//! operator's signing key is not the one that signed it (a rotated signing key). The
//! runtime reads the file once, at start; a re-signed identity reaches the pods by a rolling
//! update, since the Deployment's pod template carries the identity's expiry
//! ([`EXPIRES_ANNOTATION`]), and old pods drain on SIGTERM with their still-valid JWT.
//!
//! [`due`] (pure) decides; [`ensure`] reads the Secret, signs when due and applies it. When
//! signing fails, [`keep_or_fail`] (pure) keeps the recorded identity while it has not expired,
//! so a broken signing key or a failed Secret write does not stop the rest of the reconcile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor::connect::keys;
use conveyor::names::QueueRef;
use conveyor::permissions::{self, Permissions};
use conveyor_crds::{JobQueue, Worker};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use crate::context::{Context, FIELD_MANAGER};

/// Key of the signing-key Secret holding the account signing key's seed (`SA…`).
pub const SEED_KEY: &str = "seed";
/// Key of the signing-key Secret holding the account's public key (`A…`).
pub const ACCOUNT_KEY: &str = "account";
pub use super::deployment::{IDENTITY_EXPIRES_ANNOTATION as EXPIRES_ANNOTATION, Identity};
/// Annotation on the creds Secret with when the identity was signed (Unix seconds).
pub const ISSUED_ANNOTATION: &str = "conveyor.dev/nats-creds-issued";
/// Annotation on the creds Secret: a digest of the permissions signed into it, so a change
/// of what the Worker needs signs it again.
pub const PERMISSIONS_ANNOTATION: &str = "conveyor.dev/nats-permissions";
/// Annotation on the creds Secret with the public key (`A…`) of the signing key that signed
/// it, so a rotated signing key signs every identity again before the old key is revoked.
pub const SIGNER_ANNOTATION: &str = "conveyor.dev/nats-signer";

/// The name of a Worker's creds Secret.
pub fn secret_name(worker: &str) -> String {
    format!("{worker}-nats-creds")
}

/// Why a Worker's identity cannot be signed or stored.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The signing key's files cannot be read or used.
    #[error("the NATS account signing key in {dir} cannot be used: {message}")]
    SigningKey {
        /// The mounted Secret's directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// Signing failed.
    #[error("cannot sign the Worker's NATS identity: {0}")]
    Sign(#[from] conveyor::jwt::JwtError),
    /// A Secret of that name exists and is not this Worker's: it is left alone.
    #[error(
        "Secret {name} exists and is not owned by this Worker; rename or delete it so the operator can write the Worker's NATS identity there"
    )]
    Foreign {
        /// The Secret's name.
        name: String,
    },
    /// Reading or writing the creds Secret failed.
    #[error("cannot read or write Secret {name}: {source}")]
    Secret {
        /// The Secret's name.
        name: String,
        /// Kubernetes error.
        source: kube::Error,
    },
}

/// The account signing key the operator signs with, read from its mounted Secret.
#[derive(Debug)]
pub struct SigningKey {
    key: nkeys::KeyPair,
    account: String,
}

impl SigningKey {
    /// Reads `seed` and `account` from `dir` (read on every reconcile, so a rotated signing
    /// key is used as soon as the kubelet refreshes the mount).
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let fail = |message: String| IdentityError::SigningKey {
            dir: dir.to_owned(),
            message,
        };
        let read = |key: &str| {
            std::fs::read_to_string(dir.join(key))
                .map(|text| text.trim().to_owned())
                .map_err(|e| fail(format!("reading {key}: {e}")))
        };
        let seed = read(SEED_KEY)?;
        let account = read(ACCOUNT_KEY)?;
        let key = nkeys::KeyPair::from_seed(&seed)
            .map_err(|_| fail(format!("{SEED_KEY} is not an nkey seed")))?;
        if !seed.starts_with("SA") {
            return Err(fail(format!(
                "{SEED_KEY} is not an account signing key (its seed starts with SA)"
            )));
        }
        if !account.starts_with('A') || nkeys::KeyPair::from_public_key(&account).is_err() {
            return Err(fail(format!(
                "{ACCOUNT_KEY} is not an account public key (A…)"
            )));
        }
        Ok(Self { key, account })
    }

    /// The signing key's public key (`A…`), recorded on the identities it signs.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }
}

/// What the Worker `worker` of `queue` may do, with the inbox prefix of its uid.
pub fn worker_permissions(worker: &Worker, queue: &JobQueue) -> (Permissions, String) {
    let prefix = permissions::worker_inbox_prefix(&worker.uid().unwrap_or_default());
    let queue_ref = QueueRef::new(queue.namespace().unwrap_or_default(), queue.name_any());
    let set = permissions::worker(
        &queue_ref,
        queue.spec.priorities,
        queue.spec.rate_limit.is_some(),
        &prefix,
    );
    (set, prefix)
}

/// A short, stable digest of a permission set (FNV-1a of the lists), to notice a change.
pub fn digest(set: &Permissions) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (list, subjects) in [("pub", &set.publish_allow), ("sub", &set.subscribe_allow)] {
        for part in std::iter::once(list).chain(subjects.iter().map(String::as_str)) {
            for byte in part.bytes().chain([0]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("{hash:016x}")
}

/// What the existing Secret says: (issued, expires, permissions digest), when it has all.
fn recorded(secret: &Secret) -> Option<(i64, i64, &str)> {
    let notes = secret.metadata.annotations.as_ref()?;
    let issued = notes.get(ISSUED_ANNOTATION)?.parse().ok()?;
    let expires = notes.get(EXPIRES_ANNOTATION)?.parse().ok()?;
    let digest = notes.get(PERMISSIONS_ANNOTATION)?;
    let has_creds = secret
        .data
        .as_ref()
        .is_some_and(|d| d.get(keys::CREDS).is_some_and(|c| !c.0.is_empty()));
    has_creds.then_some((issued, expires, digest.as_str()))
}

/// Whether `secret` is the Worker's (an owner reference with the Worker's uid), so the
/// operator may overwrite it.
pub fn owned_by(secret: &Secret, worker_uid: &str) -> bool {
    secret
        .owner_references()
        .iter()
        .any(|owner| owner.uid == worker_uid)
}

/// When the identity in `existing` is due to be signed again, as of `now`: `None` while it is
/// younger than half its lifetime, holds `digest`'s permissions and was signed by `signer`
/// (the current signing key's public key; `None` when the key cannot be read, then the
/// signer is not compared), else `Some(reason)`. An identity that records no signer (signed
/// before the operator recorded it) counts as another key's.
pub fn due(
    existing: Option<&Secret>,
    digest: &str,
    signer: Option<&str>,
    now: i64,
) -> Option<&'static str> {
    let Some(secret) = existing else {
        return Some("none yet");
    };
    let Some((issued, expires, signed)) = recorded(secret) else {
        return Some("the Secret holds no identity of the operator's");
    };
    if signed != digest {
        return Some("the permissions it needs changed");
    }
    if let Some(signer) = signer {
        let recorded_signer = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|notes| notes.get(SIGNER_ANNOTATION));
        if recorded_signer.map(String::as_str) != Some(signer) {
            return Some("the operator's signing key changed");
        }
    }
    if now >= renew_at(issued, expires) {
        return Some("half its lifetime passed");
    }
    None
}

fn renew_at(issued: i64, expires: i64) -> i64 {
    issued.saturating_add(expires.saturating_sub(issued) / 2)
}

/// What the identity step came to.
#[derive(Debug)]
pub enum Outcome {
    /// The identity the pods use: the recorded one, or one signed now (with the reason it
    /// was signed, for the Event).
    Current(Identity, Option<&'static str>),
    /// Signing was due and failed, but the recorded identity has not expired: the pods keep
    /// it, and the step tries again by the resync period (at the latest at its expiry).
    Kept(Identity, IdentityError),
}

/// On a failure to sign: the recorded identity, kept while it has not expired by `now`
/// (asked to be tried again no later than its expiry), else the error, since no valid
/// identity remains.
pub fn keep_or_fail(
    recorded: Option<Identity>,
    error: IdentityError,
    now: i64,
) -> Result<Outcome, IdentityError> {
    match recorded {
        Some(identity) if identity.expires_at > now => Ok(Outcome::Kept(
            Identity {
                renew_at: identity.expires_at,
                ..identity
            },
            error,
        )),
        _ => Err(error),
    }
}

/// Step: the Worker's identity, signed now if [`due`] (or kept, see [`keep_or_fail`]), or
/// `None` when the operator has no signing key.
pub async fn ensure(
    worker: &Worker,
    queue: &JobQueue,
    ctx: &Context,
    now: i64,
) -> Result<Option<Outcome>, IdentityError> {
    let Some(dir) = ctx.config.nats_signing_key_dir.as_deref() else {
        return Ok(None);
    };
    let name = secret_name(&worker.name_any());
    let api: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &worker.namespace().unwrap_or_default());
    let secret_error = |source| IdentityError::Secret {
        name: name.clone(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(secret_error)?;
    let uid = worker.uid().unwrap_or_default();
    if existing.as_ref().is_some_and(|s| !owned_by(s, &uid)) {
        return Err(IdentityError::Foreign { name });
    }
    let (set, inbox_prefix) = worker_permissions(worker, queue);
    let digest = digest(&set);
    let identity = |issued: i64, expires_at: i64| Identity {
        secret: name.clone(),
        inbox_prefix: inbox_prefix.clone(),
        expires_at,
        renew_at: renew_at(issued, expires_at),
    };
    // Read before deciding, so a rotated signing key is noticed; a key that cannot be read
    // only fails the step when something else makes the identity due.
    let signing = SigningKey::load(dir);
    let signer = signing.as_ref().ok().map(SigningKey::public_key);
    let reason = due(existing.as_ref(), &digest, signer.as_deref(), now);
    let kept = existing
        .as_ref()
        .and_then(recorded)
        .map(|(issued, expires, _)| identity(issued, expires));
    if let (None, Some(current)) = (reason, kept.clone()) {
        return Ok(Some(Outcome::Current(current, None)));
    }
    let reason = reason.unwrap_or("none yet");
    // At most a year (the flag's parser), so the conversion cannot fail; saturate if it did.
    let lifetime = i64::try_from(ctx.config.nats_identity_lifetime.as_secs()).unwrap_or(i64::MAX);
    let signed = match signing {
        Ok(signing) => sign_into(&api, worker, &signing, &set, &digest, now, lifetime).await,
        Err(error) => Err(error),
    };
    match signed {
        Ok(expires_at) => Ok(Some(Outcome::Current(
            identity(now, expires_at),
            Some(reason),
        ))),
        Err(error) => keep_or_fail(kept, error, now).map(Some),
    }
}

/// Signs the Worker's identity with `set` and `signing` and applies it into its Secret;
/// returns its expiry.
async fn sign_into(
    api: &Api<Secret>,
    worker: &Worker,
    signing: &SigningKey,
    set: &Permissions,
    digest: &str,
    now: i64,
    lifetime: i64,
) -> Result<i64, IdentityError> {
    let name = secret_name(&worker.name_any());
    let user = conveyor::jwt::user(
        &signing.key,
        &signing.account,
        &format!(
            "{}/{}",
            worker.namespace().unwrap_or_default(),
            worker.name_any()
        ),
        set,
        now,
        lifetime,
    )?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: worker.namespace(),
            labels: Some(super::deployment::selector_labels(&worker.name_any())),
            annotations: Some(BTreeMap::from([
                (ISSUED_ANNOTATION.to_owned(), now.to_string()),
                (EXPIRES_ANNOTATION.to_owned(), user.expires_at.to_string()),
                (PERMISSIONS_ANNOTATION.to_owned(), digest.to_owned()),
                (SIGNER_ANNOTATION.to_owned(), signing.public_key()),
            ])),
            owner_references: worker.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            keys::CREDS.to_owned(),
            ByteString(user.creds().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let mut body = serde_json::to_value(&secret).unwrap_or_default();
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| IdentityError::Secret { name, source })?;
    Ok(user.expires_at)
}

/// How long until the identity must be signed again, at least a second (the reconcile is
/// requeued by then).
pub fn until_renewal(identity: &Identity, now: i64) -> Duration {
    Duration::from_secs(
        u64::try_from(identity.renew_at.saturating_sub(now))
            .unwrap_or(0)
            .max(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(issued: i64, expires: i64, digest: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (ISSUED_ANNOTATION.to_owned(), issued.to_string()),
                    (EXPIRES_ANNOTATION.to_owned(), expires.to_string()),
                    (PERMISSIONS_ANNOTATION.to_owned(), digest.to_owned()),
                    (SIGNER_ANNOTATION.to_owned(), "AKEY".to_owned()),
                ])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                keys::CREDS.to_owned(),
                ByteString(b"creds".to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn an_identity_is_signed_again_at_half_life_or_when_its_permissions_change() {
        let s = secret(1_000, 1_100, "d");
        let key = Some("AKEY");
        assert_eq!(due(None, "d", key, 1_000), Some("none yet"));
        assert_eq!(due(Some(&s), "d", key, 1_000), None);
        assert_eq!(due(Some(&s), "d", key, 1_049), None);
        assert_eq!(
            due(Some(&s), "d", key, 1_050),
            Some("half its lifetime passed")
        );
        assert_eq!(
            due(Some(&s), "other", key, 1_001),
            Some("the permissions it needs changed")
        );
        let mut empty = s.clone();
        empty.data = None;
        assert!(
            due(Some(&empty), "d", key, 1_001).is_some(),
            "no creds in it"
        );
        let mut foreign = s;
        foreign.metadata.annotations = None;
        assert!(due(Some(&foreign), "d", key, 1_001).is_some(), "not ours");
    }

    #[test]
    fn a_rotated_signing_key_signs_the_identity_again() {
        let s = secret(1_000, 1_100, "d");
        assert_eq!(due(Some(&s), "d", Some("AKEY"), 1_001), None);
        assert_eq!(
            due(Some(&s), "d", Some("ANEWKEY"), 1_001),
            Some("the operator's signing key changed")
        );
        assert_eq!(
            due(Some(&s), "d", None, 1_001),
            None,
            "an unreadable key is not a rotation"
        );
        let mut unrecorded = s;
        if let Some(notes) = unrecorded.metadata.annotations.as_mut() {
            notes.remove(SIGNER_ANNOTATION);
        }
        assert_eq!(
            due(Some(&unrecorded), "d", Some("AKEY"), 1_001),
            Some("the operator's signing key changed"),
            "signed before the signer was recorded"
        );
    }

    #[test]
    fn a_failed_signing_keeps_the_recorded_identity_until_it_expires() {
        let recorded = Identity {
            secret: "w-nats-creds".into(),
            inbox_prefix: "_INBOX_u".into(),
            expires_at: 1_100,
            renew_at: 1_050,
        };
        let failure = || IdentityError::Foreign { name: "x".into() };
        match keep_or_fail(Some(recorded.clone()), failure(), 1_060) {
            Ok(Outcome::Kept(kept, error)) => {
                assert_eq!(kept.secret, recorded.secret);
                assert_eq!(kept.expires_at, 1_100);
                assert_eq!(
                    kept.renew_at, 1_100,
                    "tried again by its expiry at the latest"
                );
                assert!(matches!(error, IdentityError::Foreign { .. }));
            }
            other => panic!("kept until expiry, got {other:?}"),
        }
        assert!(
            keep_or_fail(Some(recorded.clone()), failure(), 1_100).is_err(),
            "expired: no valid identity remains"
        );
        assert!(
            keep_or_fail(None, failure(), 1_000).is_err(),
            "none recorded"
        );
    }

    #[test]
    fn only_the_workers_own_secret_is_overwritten() {
        let mut s = secret(1, 2, "d");
        assert!(!owned_by(&s, "uid-1"), "no owner: a user's Secret");
        s.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                uid: "uid-1".into(),
                ..Default::default()
            },
        ]);
        assert!(owned_by(&s, "uid-1"));
        assert!(!owned_by(&s, "uid-2"), "another (or a recreated) Worker's");
    }

    #[test]
    fn the_digest_follows_the_permissions() {
        let queue = QueueRef::new("team", "mail");
        let one = permissions::worker(&queue, 1, false, "_INBOX_a");
        assert_eq!(digest(&one), digest(&one.clone()));
        assert_ne!(
            digest(&one),
            digest(&permissions::worker(&queue, 2, false, "_INBOX_a"))
        );
        assert_ne!(
            digest(&one),
            digest(&permissions::worker(&queue, 1, true, "_INBOX_a"))
        );
        let moved = Permissions {
            publish_allow: vec![],
            subscribe_allow: one.publish_allow.clone(),
        };
        let kept = Permissions {
            publish_allow: one.publish_allow.clone(),
            subscribe_allow: vec![],
        };
        assert_ne!(digest(&moved), digest(&kept), "the lists are told apart");
    }

    #[test]
    fn the_signing_key_must_be_an_account_seed_with_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let write = |seed: &str, account: &str| {
            std::fs::write(dir.path().join(SEED_KEY), seed).unwrap();
            std::fs::write(dir.path().join(ACCOUNT_KEY), account).unwrap();
        };
        let account = nkeys::KeyPair::new_account();
        let signing = nkeys::KeyPair::new_account();
        write(&signing.seed().unwrap(), &account.public_key());
        let loaded = SigningKey::load(dir.path()).unwrap();
        assert_eq!(loaded.account, account.public_key());
        write(
            &nkeys::KeyPair::new_user().seed().unwrap(),
            &account.public_key(),
        );
        assert!(SigningKey::load(dir.path()).is_err(), "a user seed");
        write(&signing.seed().unwrap(), "not-a-key");
        assert!(SigningKey::load(dir.path()).is_err(), "no account");
        let missing = tempfile::tempdir().unwrap();
        let error = SigningKey::load(missing.path()).unwrap_err().to_string();
        assert!(error.contains("reading seed"), "{error}");
        assert!(
            !format!("{:?}", SigningKey::load(dir.path())).contains(&signing.seed().unwrap()),
            "the seed is not in the error"
        );
    }
}
