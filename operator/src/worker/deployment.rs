//! The Deployment of a `Worker`, built by a pure function: the user's pod template with the
//! Conveyor worker runtime injected as `docs/development.md` ("Runtime injection") describes:
//! an init container copies the runtime into an `emptyDir`, and the user's first container runs
//! `conveyor-worker run -- <handler.command>` with the settings the runtime reads. In `http`
//! mode the user's container is the web server and is left as it is; the runtime runs as a
//! container of its own ([`RUNTIME_CONTAINER`]) from the runtime image, without a command.

use std::collections::BTreeMap;

use conveyor::connect::{self, NatsOptions, env as connect_env};
use conveyor::names::env;
use conveyor_crds::{HandlerMode, JobQueue, Worker};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

/// Name of the init container that copies the runtime into the pod.
pub const INSTALL_CONTAINER: &str = "install-conveyor-runtime";
/// Name of the container that runs the runtime beside the user's web server (`http` mode).
pub const RUNTIME_CONTAINER: &str = "conveyor-worker";
/// Name of the shared volume that holds the runtime binary.
pub const RUNTIME_VOLUME: &str = "conveyor-runtime";
/// Where the runtime volume is mounted.
pub const RUNTIME_MOUNT: &str = "/conveyor";
/// The runtime binary inside the runtime image.
pub const RUNTIME_IN_IMAGE: &str = "/usr/local/bin/conveyor-worker";
/// The runtime binary once installed into the shared volume.
pub const RUNTIME_INSTALLED: &str = "/conveyor/bin/conveyor-worker";
/// Port of the runtime's health and metrics server.
pub const HEALTH_PORT: i32 = 9090;
/// Volume of the queue's NATS credentials Secret (`spec.nats.credentialsSecret`).
pub const NATS_CREDENTIALS_VOLUME: &str = "conveyor-nats-credentials";
/// Where the credentials Secret is mounted; the runtime reads it from there.
pub const NATS_CREDENTIALS_MOUNT: &str = "/etc/conveyor/nats/credentials";
/// Volume of the queue's NATS TLS Secret (`spec.nats.tlsSecret`).
pub const NATS_TLS_VOLUME: &str = "conveyor-nats-tls";
/// Where the TLS Secret is mounted.
pub const NATS_TLS_MOUNT: &str = "/etc/conveyor/nats/tls";
/// Env var holding the pod IP, referenced by the health address.
const POD_IP: &str = "CONVEYOR_POD_IP";
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// Part of the grace period kept for the runtime's last poll (its 5 s default) and exit.
const DRAIN_MARGIN_SECONDS: i64 = 7;

/// Label every worker pod carries.
pub const NAME_LABEL: (&str, &str) = ("app.kubernetes.io/name", "conveyor-worker");
/// Label naming the `Worker` a pod belongs to.
pub const WORKER_LABEL: &str = "conveyor.dev/worker";

/// Annotation (on the Worker's creds Secret and its pod template) with its NATS identity's
/// expiry, in seconds since the Unix epoch.
pub const IDENTITY_EXPIRES_ANNOTATION: &str = "conveyor.dev/nats-creds-expires";

/// A Worker's own NATS identity as its Deployment uses it (signed by the identity step,
/// [`super::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The creds Secret, mounted in place of the queue's credentials Secret.
    pub secret: String,
    /// The client's inbox prefix (the only one it may subscribe under).
    pub inbox_prefix: String,
    /// When the JWT expires (Unix seconds); in the pod template, so a new one rolls the pods.
    pub expires_at: i64,
    /// When to sign again (Unix seconds): half-way through the lifetime.
    pub renew_at: i64,
}

/// A Worker that cannot be rendered; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The pod template has no container to run the handler in.
    #[error("template.spec.containers is empty: it needs the container that runs the handler")]
    NoContainer,
    /// `exec`/`jsonl` without a command.
    #[error("handler.command is required for the {0} mode")]
    NoCommand(&'static str),
    /// `http` without a URL.
    #[error("handler.url is required for the http mode")]
    NoUrl,
}

/// What the Deployment is built from besides the Worker itself.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The queue the Worker consumes.
    pub queue: &'a JobQueue,
    /// Runtime image (`--worker-image`).
    pub worker_image: &'a str,
    /// NATS URL when the queue has no override (`--nats-url`).
    pub default_nats_url: &'a str,
    /// Number of pods.
    pub replicas: i32,
    /// The Worker's own NATS identity, signed by the operator (`--nats-signing-key-dir`): its
    /// creds Secret is mounted in place of the queue's credentials Secret.
    pub identity: Option<&'a Identity>,
}

/// The labels that select a Worker's pods.
pub fn selector_labels(worker_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.0.to_owned(), NAME_LABEL.1.to_owned()),
        (WORKER_LABEL.to_owned(), worker_name.to_owned()),
    ])
}

/// The selector as a string, for the Worker's scale subresource.
pub fn selector_string(worker_name: &str) -> String {
    selector_labels(worker_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders the Deployment of `worker`.
pub fn build(worker: &Worker, inputs: Inputs<'_>) -> Result<Deployment, BuildError> {
    let name = worker.name_any();
    let spec = &worker.spec;
    let selector = selector_labels(&name);
    let mut template = spec.template.clone();

    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.extend(selector.clone());
    labels.insert("conveyor.dev/queue".into(), spec.queue.clone());
    if let Some(identity) = inputs.identity {
        // A re-signed identity changes the template, so the pods roll onto it (the runtime
        // reads its creds once); old pods drain with their JWT, valid until it expires.
        meta.annotations.get_or_insert_with(BTreeMap::new).insert(
            IDENTITY_EXPIRES_ANNOTATION.into(),
            identity.expires_at.to_string(),
        );
    }

    let pod = template.spec.get_or_insert_with(Default::default);
    if pod.containers.is_empty() {
        return Err(BuildError::NoContainer);
    }
    pod.security_context.get_or_insert_with(restricted_pod);
    let grace = pod
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    let mut runtime_env = runtime_env(worker, inputs, grace);
    // Credentials and TLS reach the runtime as files of mounted Secrets, never as env values.
    let secrets = nats_secret_volumes(inputs.queue, inputs.identity);
    pod.volumes
        .get_or_insert_with(Vec::new)
        .extend(secrets.iter().map(|(volume, _)| volume.clone()));
    if spec.handler.mode == HandlerMode::Http {
        // The handler is a web server: the user's container runs as its image says, and the
        // runtime runs beside it from its own image (nothing to install into the user's image)
        // and posts each job to the server over the pod's loopback.
        let url = spec
            .handler
            .url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or(BuildError::NoUrl)?;
        runtime_env.push(EnvVar {
            name: env::HANDLER_URL.into(),
            value: Some(url),
            value_from: None,
        });
        let mut runtime = Container {
            name: RUNTIME_CONTAINER.into(),
            image: Some(inputs.worker_image.to_owned()),
            command: Some(vec![RUNTIME_IN_IMAGE.into(), "run".into()]),
            volume_mounts: Some(secrets.into_iter().map(|(_, mount)| mount).collect()),
            ..Default::default()
        };
        inject(&mut runtime, runtime_env);
        pod.containers.push(runtime);
    } else {
        let command = spec
            .handler
            .command
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or(BuildError::NoCommand(spec.handler.mode.as_str()))?;
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: RUNTIME_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        let install = Container {
            name: INSTALL_CONTAINER.into(),
            image: Some(inputs.worker_image.to_owned()),
            command: Some(vec![
                RUNTIME_IN_IMAGE.into(),
                "install".into(),
                format!("{RUNTIME_MOUNT}/bin"),
            ]),
            volume_mounts: Some(vec![runtime_mount()]),
            security_context: Some(restricted_container()),
            ..Default::default()
        };
        pod.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, install);
        let main = &mut pod.containers[0];
        let mut wrapped = vec![RUNTIME_INSTALLED.to_owned(), "run".into(), "--".into()];
        wrapped.extend(command);
        main.command = Some(wrapped);
        main.args = None;
        let mounts = main.volume_mounts.get_or_insert_with(Vec::new);
        mounts.push(runtime_mount());
        mounts.extend(secrets.into_iter().map(|(_, mount)| mount));
        inject(main, runtime_env);
    }

    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: worker.namespace(),
            labels: Some(selector.clone()),
            owner_references: worker.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(inputs.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template,
            ..Default::default()
        }),
        status: None,
    })
}

/// Adds the runtime's settings, health port, probes and default security context to the
/// container that runs the runtime. Settings the user also set are replaced by ours; probes and
/// a security context the user set are kept.
fn inject(container: &mut Container, mut runtime_env: Vec<EnvVar>) {
    let (liveness, readiness) = health_probes();
    // The runtime keeps its running jobs' ids in the termination message file, so a pod that
    // dies mid-job (OOM-kill included) tells which job it ran.
    let termination = container
        .termination_message_path
        .get_or_insert_with(|| TERMINATION_MESSAGE_PATH.into())
        .clone();
    runtime_env.push(EnvVar {
        name: env::TERMINATION_MESSAGE_PATH.into(),
        value: Some(termination),
        value_from: None,
    });
    let vars = container.env.get_or_insert_with(Vec::new);
    vars.retain(|v| !runtime_env.iter().any(|r| r.name == v.name));
    vars.extend(runtime_env);
    let ports = container.ports.get_or_insert_with(Vec::new);
    if !ports.iter().any(|p| p.container_port == HEALTH_PORT) {
        ports.push(ContainerPort {
            name: Some("conveyor".into()),
            container_port: HEALTH_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    container.liveness_probe.get_or_insert(liveness);
    container.readiness_probe.get_or_insert(readiness);
    container
        .security_context
        .get_or_insert_with(restricted_container);
}

fn runtime_env(worker: &Worker, inputs: Inputs<'_>, grace_seconds: i64) -> Vec<EnvVar> {
    let spec = &worker.spec;
    let queue = inputs.queue;
    let nats = queue.spec.nats.as_ref();
    let nats_url = shown_url(nats.map_or(inputs.default_nats_url, |n| n.url.as_str()));
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    };
    let mut vars = vec![
        value(env::NATS_URL, nats_url),
        value(env::QUEUE_NAMESPACE, queue.namespace().unwrap_or_default()),
        value(env::QUEUE_NAME, queue.name_any()),
        value(env::PRIORITIES, queue.spec.priorities.to_string()),
        // A pod never runs more jobs at once than the queue's concurrencyLimit, whatever its
        // priority levels (each level's consumer alone would allow the whole limit).
        value(
            env::CONCURRENCY,
            queue
                .spec
                .concurrency_limit
                .map_or(spec.concurrency, |limit| spec.concurrency.min(limit))
                .to_string(),
        ),
        value(env::HANDLER_MODE, spec.handler.mode.as_str().to_owned()),
    ];
    if let Some(identity) = inputs.identity {
        vars.push(value(
            connect_env::NATS_CREDENTIALS_DIR,
            NATS_CREDENTIALS_MOUNT.into(),
        ));
        vars.push(value(
            connect_env::NATS_INBOX_PREFIX,
            identity.inbox_prefix.clone(),
        ));
    } else if nats.is_some_and(|n| n.credentials_secret.is_some()) {
        vars.push(value(
            connect_env::NATS_CREDENTIALS_DIR,
            NATS_CREDENTIALS_MOUNT.into(),
        ));
    }
    if nats.is_some_and(|n| n.tls_secret.is_some()) {
        vars.push(value(connect_env::NATS_TLS_DIR, NATS_TLS_MOUNT.into()));
    }
    let backoff = &queue.spec.retry.backoff;
    vars.push(value(env::BACKOFF_INITIAL, backoff.initial.clone()));
    vars.push(value(env::BACKOFF_MAX, backoff.max.clone()));
    vars.push(value(
        env::BACKOFF_MULTIPLIER,
        backoff.multiplier.to_string(),
    ));
    vars.push(value(env::BACKOFF_JITTER, backoff.jitter.to_string()));
    // A SIGTERM'd runtime must give back what it cannot finish before the kubelet kills it.
    let drain = (grace_seconds - DRAIN_MARGIN_SECONDS).max(1);
    vars.push(value(env::DRAIN_TIMEOUT, format!("{drain}s")));
    if queue.spec.results.is_some() {
        vars.push(value(env::STORE_RESULTS, "true".into()));
    }
    if queue.spec.rate_limit.is_some() {
        vars.push(value(env::RATE_LIMITED, "true".into()));
    }
    if let Some(max_jobs) = spec.recycle.as_ref().and_then(|r| r.max_jobs) {
        vars.push(value(env::MAX_JOBS, max_jobs.to_string()));
    }
    vars.push(field(env::POD_NAME, "metadata.name"));
    // POD_IP must come before the variable that references it.
    vars.push(field(POD_IP, "status.podIP"));
    vars.push(value(
        env::HEALTH_ADDR,
        format!("$({POD_IP}):{HEALTH_PORT}"),
    ));
    vars
}

/// The URL without userinfo (the CRD refuses userinfo in `spec.nats.url`; this keeps it out
/// of the Deployment whatever the API server let through).
fn shown_url(url: &str) -> String {
    NatsOptions::new(url).map_or_else(|_| connect::redact(url), |o| o.url().to_owned())
}

/// The Secret volumes (and their read-only mounts) of the queue's `spec.nats`, the Worker's
/// own identity's creds Secret in place of the queue's credentials when it has one.
fn nats_secret_volumes(
    queue: &JobQueue,
    identity: Option<&Identity>,
) -> Vec<(Volume, VolumeMount)> {
    let nats = queue.spec.nats.as_ref();
    let credentials = match identity {
        Some(identity) => Some(identity.secret.as_str()),
        None => nats.and_then(|n| n.credentials_secret.as_deref()),
    };
    [
        (credentials, NATS_CREDENTIALS_VOLUME, NATS_CREDENTIALS_MOUNT),
        (
            nats.and_then(|n| n.tls_secret.as_deref()),
            NATS_TLS_VOLUME,
            NATS_TLS_MOUNT,
        ),
    ]
    .into_iter()
    .filter_map(|(secret, volume, mount)| {
        let secret = secret?;
        Some((
            Volume {
                name: volume.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.to_owned()),
                    default_mode: Some(0o444),
                    ..Default::default()
                }),
                ..Default::default()
            },
            VolumeMount {
                name: volume.into(),
                mount_path: mount.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ))
    })
    .collect()
}

/// Kubernetes' default `terminationMessagePath`.
const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

fn health_probes() -> (Probe, Probe) {
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    };
    (probe("/healthz", 10), probe("/readyz", 5))
}

fn runtime_mount() -> VolumeMount {
    VolumeMount {
        name: RUNTIME_VOLUME.into(),
        mount_path: RUNTIME_MOUNT.into(),
        ..Default::default()
    }
}

/// The "restricted" Pod Security Standard for a container.
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

/// The "restricted" Pod Security Standard for a pod.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

#[cfg(test)]
mod tests;
