//! Where a queue's NATS server is, when `--nats-url` is not given: the `JobQueue` says so
//! (`status.natsUrl`, written by the operator, else `spec.nats.url`), looked up through the
//! kubeconfig — which is how `kubectl conveyor` finds queues on a cluster. Credentials and TLS
//! come from the NATS flags ([`crate::args::NatsArgs`]); [`connect`] is the one place the CLI
//! opens a NATS connection, through the SDK's [`NatsOptions`].

use anyhow::{Context as _, anyhow};
use conveyor_crds::JobQueue;
use kube::Api;
use kube::config::KubeConfigOptions;

use crate::args::{NatsArgs, QueueArgs};
use conveyor::connect::{Auth, NatsOptions, read_secret_file};

/// The URL used when neither `--nats-url` nor a kubeconfig is there (`conveyor dev`'s habit of
/// a local server).
pub const LOCAL_NATS: &str = "nats://127.0.0.1:4222";

/// The NATS URL of `queue` (or, without one, of the namespace's first JobQueue).
pub async fn nats_url(args: &QueueArgs, queue: Option<&str>) -> anyhow::Result<String> {
    if let Some(url) = &args.nats_url {
        return Ok(url.clone());
    }
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match kube::Config::from_kubeconfig(&options).await {
        Ok(config) => config,
        Err(err) if args.context.is_none() => {
            tracing::debug!(%err, "no kubeconfig; using {LOCAL_NATS}");
            return Ok(LOCAL_NATS.to_owned());
        }
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "reading kubeconfig context {:?}",
                    args.context.as_deref().unwrap_or_default()
                )
            });
        }
    };
    let client = kube::Client::try_from(config).context("building a Kubernetes client")?;
    let ns = &args.namespace;
    let api: Api<JobQueue> = Api::namespaced(client, ns);
    let hint = "pass --nats-url (e.g. with `kubectl port-forward` to your NATS)";
    let jq = match queue {
        Some(name) => api
            .get_opt(name)
            .await
            .with_context(|| format!("looking up JobQueue {ns}/{name} to find its NATS; {hint}"))?
            // A name that is not there is the user's typo, not a NATS question.
            .ok_or_else(|| anyhow!("no JobQueue {name} in namespace {ns}"))?,
        None => api
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .with_context(|| format!("listing the JobQueues of {ns} to find their NATS; {hint}"))?
            .items
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("namespace {ns} has no JobQueue to find NATS from; {hint}"))?,
    };
    let name = kube::ResourceExt::name_any(&jq);
    jq.status
        .and_then(|s| s.nats_url)
        .or_else(|| jq.spec.nats.map(|n| n.url))
        .ok_or_else(|| {
            anyhow!(
                "JobQueue {ns}/{name} does not say where its NATS is yet (no status.natsUrl: \
                 is the operator running?); {hint}"
            )
        })
}

/// The connection settings of `queue`'s NATS: the URL (found as [`nats_url`] says) with the
/// credentials and TLS of the NATS flags.
pub async fn nats_options(args: &QueueArgs, queue: Option<&str>) -> anyhow::Result<NatsOptions> {
    let url = nats_url(args, queue).await?;
    options_from(&url, &args.nats)
}

/// `url` with the credentials and TLS of `flags`.
pub fn options_from(url: &str, flags: &NatsArgs) -> anyhow::Result<NatsOptions> {
    let mut options = NatsOptions::new(url)?.name("conveyor-cli");
    if let Some(dir) = &flags.nats_credentials_dir {
        options = options.credentials_dir(dir)?;
    }
    let mut given = Vec::new();
    if let (Some(user), Some(file)) = (&flags.nats_user, &flags.nats_password_file) {
        given.push(Auth::UserPassword {
            user: user.clone(),
            password: read_secret_file("password", file)?,
        });
    }
    if let Some(file) = &flags.nats_token_file {
        given.push(Auth::Token(read_secret_file("token", file)?));
    }
    if let Some(file) = &flags.nats_nkey_file {
        given.push(Auth::Nkey(read_secret_file("nkey seed", file)?));
    }
    if let Some(file) = &flags.nats_creds {
        let creds = read_secret_file("credentials file", file)?;
        // An identity Conveyor signed may subscribe under its own inbox prefix only.
        if let Some(prefix) = crate::credentials::inbox_prefix_of(creds.expose()) {
            options = options.inbox_prefix(prefix);
        }
        given.push(Auth::Creds(creds));
    }
    if given.len() > 1 {
        return Err(anyhow!(
            "give one kind of NATS credentials: --nats-user/--nats-password-file, \
             --nats-token-file, --nats-nkey-file or --nats-creds"
        ));
    }
    for auth in given {
        options = options.auth(auth)?;
    }
    if flags.tls_required {
        options.tls.required = true;
    }
    if let Some(ca) = &flags.tls_ca {
        options.tls.ca = Some(ca.clone());
        options.tls.required = true;
    }
    if let (Some(cert), Some(key)) = (&flags.tls_cert, &flags.tls_key) {
        options.tls.client_cert = Some((cert.clone(), key.clone()));
        options.tls.required = true;
    }
    Ok(options)
}

/// Connects to `queue`'s NATS; the error names the URL without userinfo and the server's
/// reason (authorization violation, TLS …).
pub async fn connect(args: &QueueArgs, queue: Option<&str>) -> anyhow::Result<async_nats::Client> {
    let options = nats_options(args, queue).await?;
    Ok(options.connect().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_kind_of_credentials_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k\n").unwrap();
        let flags = NatsArgs {
            nats_token_file: Some(token.clone()),
            ..NatsArgs::default()
        };
        let options = options_from("nats://h:4222", &flags).unwrap();
        assert_eq!(
            options.auth,
            Auth::Token(conveyor::connect::Secret::new("t0k"))
        );
        let both = NatsArgs {
            nats_token_file: Some(token.clone()),
            nats_nkey_file: Some(token),
            ..NatsArgs::default()
        };
        assert!(options_from("nats://h:4222", &both).is_err());
        let clash = options_from("nats://u:p@h:4222", &flags).unwrap_err();
        assert!(!clash.to_string().contains(":p@"), "{clash}");
    }

    #[test]
    fn a_ca_implies_tls() {
        let flags = NatsArgs {
            tls_ca: Some("/ca.pem".into()),
            ..NatsArgs::default()
        };
        let options = options_from("nats://h:4222", &flags).unwrap();
        assert!(options.tls.required);
    }
}
