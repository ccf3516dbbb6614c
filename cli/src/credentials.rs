//! `conveyor credentials QUEUE`: signs a producer identity for one queue with an account
//! signing key and prints its `.creds` file. It asks nothing of the operator or the cluster:
//! whoever holds the signing key (the Secret the operator is given) can issue one.
//!
//! The identity may publish the queue's jobs, delayed jobs and cancellations, read its
//! streams (stored results) and receive replies under its own inbox prefix
//! (`_INBOX.<id>`, still an `_INBOX.` subject, so workers answer it), nothing else
//! ([`conveyor::permissions::producer`]). The other commands take the prefix from the creds
//! file themselves ([`inbox_prefix_of`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::Args;
use conveyor::connect::read_secret_file;
use conveyor::names::QueueRef;
use conveyor::{jwt, permissions};

/// Longest lifetime a producer identity may be given: a year.
const MAX_VALID_FOR: Duration = Duration::from_secs(365 * 86_400);

/// Arguments of `conveyor credentials`.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// Name of the JobQueue the identity may submit to.
    pub queue: String,
    /// Kubernetes namespace of the JobQueue.
    #[arg(
        long,
        short = 'n',
        env = "CONVEYOR_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Directory of the signing-key Secret (keys `seed`: the account signing key's seed,
    /// `SA…`, and `account`: the account's public key, `A…`), e.g. the Secret the operator
    /// is given, extracted with `kubectl get secret -o jsonpath`.
    #[arg(long, value_name = "DIR")]
    pub signing_key_dir: PathBuf,
    /// How long the identity is valid (at most a year).
    #[arg(long, default_value = "24h", value_parser = valid_for)]
    pub valid_for: Duration,
    /// Name in the JWT (shown by the server in its logs); `<namespace>/<queue>-producer` by
    /// default.
    #[arg(long)]
    pub name: Option<String>,
}

fn valid_for(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d > MAX_VALID_FOR {
        return Err("must be from 1s to 365d".into());
    }
    Ok(d)
}

/// Prints the `.creds` of a new producer identity of the queue.
pub async fn run(args: CredentialsArgs) -> anyhow::Result<()> {
    print!("{}", creds(&args, jiff::Timestamp::now().as_second())?);
    Ok(())
}

/// The `.creds` of a new producer identity, valid from `now` (Unix seconds).
fn creds(args: &CredentialsArgs, now: i64) -> anyhow::Result<String> {
    let seed = read_secret_file("signing key seed", &args.signing_key_dir.join("seed"))?;
    let account = std::fs::read_to_string(args.signing_key_dir.join("account"))
        .with_context(|| format!("reading {}/account", args.signing_key_dir.display()))?;
    let signing = nkeys::KeyPair::from_seed(seed.expose().trim())
        .map_err(|_| anyhow!("the signing key seed is not an nkey seed"))?;
    let queue = QueueRef::new(&args.namespace, &args.queue);
    // A random id: 16 base32 characters of a fresh key (80 bits).
    let id = nkeys::KeyPair::new_user().public_key()[1..17].to_lowercase();
    let prefix = format!("_INBOX.{id}");
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}/{}-producer", args.namespace, args.queue));
    let lifetime = i64::try_from(args.valid_for.as_secs()).unwrap_or(i64::MAX);
    let user = jwt::user(
        &signing,
        account.trim(),
        &name,
        &permissions::producer(&queue, &prefix),
        now,
        lifetime,
    )?;
    Ok(user.creds())
}

/// The inbox prefix a `.creds` file's JWT allows, when it allows subscribing under exactly
/// one `_INBOX` prefix (a producer or worker identity Conveyor signed): `<prefix>.>`.
pub fn inbox_prefix_of(creds: &str) -> Option<String> {
    let claims = jwt::decode(jwt::jwt_of_creds(creds)?).ok()?;
    let allowed = claims["nats"]["sub"]["allow"].as_array()?;
    let [only] = allowed.as_slice() else {
        return None;
    };
    let prefix = only.as_str()?.strip_suffix(".>")?;
    prefix.starts_with("_INBOX").then(|| prefix.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_dir() -> (tempfile::TempDir, nkeys::KeyPair) {
        let dir = tempfile::tempdir().unwrap();
        let account = nkeys::KeyPair::new_account();
        let signing = nkeys::KeyPair::new_account();
        std::fs::write(dir.path().join("seed"), signing.seed().unwrap()).unwrap();
        std::fs::write(dir.path().join("account"), account.public_key()).unwrap();
        (dir, account)
    }

    #[test]
    fn a_producer_identity_submits_to_its_queue_and_carries_its_inbox_prefix() {
        let (dir, account) = key_dir();
        let args = CredentialsArgs {
            queue: "mail".into(),
            namespace: "team".into(),
            signing_key_dir: dir.path().to_owned(),
            valid_for: Duration::from_secs(3600),
            name: None,
        };
        let creds = creds(&args, 1_000).unwrap();
        let claims = jwt::decode(jwt::jwt_of_creds(&creds).unwrap()).unwrap();
        assert_eq!(claims["nats"]["issuer_account"], account.public_key());
        assert_eq!(claims["exp"], 4_600);
        assert_eq!(claims["name"], "team/mail-producer");
        let queue = QueueRef::new("team", "mail");
        let publish = claims["nats"]["pub"]["allow"].as_array().unwrap();
        assert!(publish.contains(&queue.jobs_wildcard().into()));
        let prefix = inbox_prefix_of(&creds).unwrap();
        assert!(prefix.starts_with("_INBOX."), "{prefix}");
        assert_ne!(
            inbox_prefix_of(&super::creds(&args, 1_000).unwrap()),
            Some(prefix),
            "each identity has its own prefix"
        );
    }

    #[test]
    fn a_bad_signing_key_or_lifetime_is_refused() {
        let (dir, _) = key_dir();
        std::fs::write(dir.path().join("seed"), "SAnot-a-seed").unwrap();
        let args = CredentialsArgs {
            queue: "mail".into(),
            namespace: "team".into(),
            signing_key_dir: dir.path().to_owned(),
            valid_for: Duration::from_secs(60),
            name: None,
        };
        assert!(creds(&args, 0).is_err());
        assert!(valid_for("0s").is_err());
        assert!(valid_for("400d").is_err());
        assert_eq!(valid_for("90m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn creds_without_a_single_inbox_prefix_give_none() {
        let account = nkeys::KeyPair::new_account();
        let open = permissions::Permissions {
            publish_allow: vec![">".into()],
            subscribe_allow: vec!["_INBOX.>".into(), "x.>".into()],
        };
        let user = jwt::user(&account, &account.public_key(), "u", &open, 0, 60).unwrap();
        assert_eq!(inbox_prefix_of(&user.creds()), None);
        assert_eq!(inbox_prefix_of("not creds"), None);
    }
}
