//! Unit tests of the Deployment builder, using the `examples/hello` manifests as fixtures.

use super::*;
use conveyor_crds::{HandlerMode, HandlerSpec, WorkerSpec};

const QUEUE_YAML: &str = include_str!("../../../../examples/hello/queue.yaml");
const WORKER_YAML: &str = include_str!("../../../../examples/hello/worker.yaml");
const IMAGE: &str = "ghcr.io/conveyor-dev/conveyor-worker:test";

fn queue() -> JobQueue {
    let mut q: JobQueue = serde_yaml::from_str(QUEUE_YAML).unwrap();
    q.metadata.namespace = Some("team".into());
    q
}

fn worker() -> Worker {
    let mut w: Worker = serde_yaml::from_str(WORKER_YAML).unwrap();
    w.metadata.namespace = Some("team".into());
    w.metadata.uid = Some("uid-1".into());
    w
}

fn with_handler(mut w: Worker, handler: HandlerSpec) -> Worker {
    w.spec = WorkerSpec { handler, ..w.spec };
    w
}

fn render(w: &Worker) -> Result<Deployment, BuildError> {
    let q = queue();
    build(
        w,
        Inputs {
            queue: &q,
            worker_image: IMAGE,
            default_nats_url: "nats://nats:4222",
            replicas: 2,
            identity: None,
        },
    )
}

/// The container that runs the runtime, rendered for `w` and `q`.
fn main_container_for(w: &Worker, q: &JobQueue) -> Container {
    let inputs = Inputs {
        queue: q,
        worker_image: IMAGE,
        default_nats_url: "nats://nats:4222",
        replicas: 2,
        identity: None,
    };
    let d = build(w, inputs).unwrap();
    d.spec.unwrap().template.spec.unwrap().containers[0].clone()
}

/// The container that runs the runtime, rendered for `w` and the test queue.
fn main_container(w: &Worker) -> Container {
    main_container_for(w, &queue())
}

fn env_of(c: &Container) -> BTreeMap<String, EnvVar> {
    c.env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect()
}

#[test]
fn exec_mode_wraps_the_user_command_with_the_injected_runtime() {
    let d = render(&worker()).unwrap();
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let init = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, INSTALL_CONTAINER);
    assert_eq!(init.image.as_deref(), Some(IMAGE));
    assert_eq!(
        init.command.as_deref().unwrap(),
        ["/usr/local/bin/conveyor-worker", "install", "/conveyor/bin"]
    );
    let main = &pod.containers[0];
    assert_eq!(
        main.image.as_deref(),
        Some("ghcr.io/conveyor-dev/hello:latest")
    );
    assert_eq!(
        main.command.as_deref().unwrap(),
        ["/conveyor/bin/conveyor-worker", "run", "--", "/handler.sh"]
    );
    let mounts = main.volume_mounts.as_ref().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == RUNTIME_VOLUME && m.mount_path == "/conveyor")
    );
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(volume.name, RUNTIME_VOLUME);
    assert!(volume.empty_dir.is_some());
}

#[test]
fn injects_the_settings_the_runtime_reads() {
    let d = render(&worker()).unwrap();
    let main = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let vars = env_of(main);
    let value = |k: &str| vars[k].value.clone().unwrap();
    assert_eq!(value(env::NATS_URL), "nats://nats:4222");
    assert_eq!(value(env::QUEUE_NAMESPACE), "team");
    assert_eq!(value(env::QUEUE_NAME), "hello");
    assert_eq!(value(env::PRIORITIES), "1");
    assert_eq!(value(env::CONCURRENCY), "4");
    assert_eq!(value(env::HANDLER_MODE), "exec");
    assert_eq!(value(env::HEALTH_ADDR), "$(CONVEYOR_POD_IP):9090");
    assert_eq!(value(env::BACKOFF_INITIAL), "1s");
    assert_eq!(value(env::BACKOFF_MAX), "5m");
    assert_eq!(value(env::BACKOFF_MULTIPLIER), "2");
    assert_eq!(value(env::DRAIN_TIMEOUT), "23s");
    let field = |k: &str| {
        vars[k]
            .value_from
            .clone()
            .unwrap()
            .field_ref
            .unwrap()
            .field_path
    };
    assert_eq!(field(env::POD_NAME), "metadata.name");
    assert_eq!(field("CONVEYOR_POD_IP"), "status.podIP");
    // The referenced variable must be defined before the reference.
    let names: Vec<_> = main
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    let ip = names.iter().position(|n| *n == "CONVEYOR_POD_IP").unwrap();
    let health = names.iter().position(|n| *n == env::HEALTH_ADDR).unwrap();
    assert!(ip < health);
}

#[test]
fn queue_nats_override_reaches_the_pods() {
    let mut q = queue();
    q.spec.nats = Some(conveyor_crds::NatsConnection {
        url: "nats://other:4222".into(),
        ..Default::default()
    });
    let w = worker();
    let d = build(
        &w,
        Inputs {
            queue: &q,
            worker_image: IMAGE,
            default_nats_url: "nats://nats:4222",
            replicas: 1,
            identity: None,
        },
    )
    .unwrap();
    let vars = env_of(&d.spec.unwrap().template.spec.unwrap().containers[0]);
    assert_eq!(
        vars[env::NATS_URL].value.as_deref(),
        Some("nats://other:4222")
    );
}

#[test]
fn probes_labels_owner_and_replicas() {
    let d = render(&worker()).unwrap();
    assert_eq!(d.metadata.name.as_deref(), Some("hello"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("team"));
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Worker", Some(true))
    );
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let selector = spec.selector.match_labels.unwrap();
    assert_eq!(selector["app.kubernetes.io/name"], "conveyor-worker");
    assert_eq!(selector["conveyor.dev/worker"], "hello");
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let main = &spec.template.spec.as_ref().unwrap().containers[0];
    let live = main
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (live.path.as_deref(), &live.port),
        (Some("/healthz"), &IntOrString::Int(9090))
    );
    let ready = main
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert_eq!(
        selector_string("hello"),
        "app.kubernetes.io/name=conveyor-worker,conveyor.dev/worker=hello"
    );
}

#[test]
fn restricted_security_context_by_default_but_user_settings_win() {
    let d = render(&worker()).unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);

    let mut w = worker();
    let own = SecurityContext {
        run_as_user: Some(1000),
        ..Default::default()
    };
    w.spec.template.spec.as_mut().unwrap().containers[0].security_context = Some(own.clone());
    let d = render(&w).unwrap();
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0].security_context,
        Some(own)
    );
}

#[test]
fn user_env_with_runtime_names_is_replaced_not_duplicated() {
    let mut w = worker();
    w.spec.template.spec.as_mut().unwrap().containers[0].env = Some(vec![
        EnvVar {
            name: env::CONCURRENCY.into(),
            value: Some("99".into()),
            value_from: None,
        },
        EnvVar {
            name: "GREETING".into(),
            value: Some("hi".into()),
            value_from: None,
        },
    ]);
    let d = render(&w).unwrap();
    let main = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let all = main.env.as_ref().unwrap();
    assert_eq!(all.iter().filter(|v| v.name == env::CONCURRENCY).count(), 1);
    assert_eq!(env_of(main)[env::CONCURRENCY].value.as_deref(), Some("4"));
    assert_eq!(env_of(main)["GREETING"].value.as_deref(), Some("hi"));
}

#[test]
fn rejects_what_the_schema_should_have_caught() {
    let no_command = with_handler(
        worker(),
        HandlerSpec {
            mode: HandlerMode::Jsonl,
            command: Some(vec![]),
            url: None,
        },
    );
    assert_eq!(
        render(&no_command).unwrap_err(),
        BuildError::NoCommand("jsonl")
    );
    let mut empty = worker();
    empty
        .spec
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers
        .clear();
    assert_eq!(render(&empty).unwrap_err(), BuildError::NoContainer);
}

#[test]
fn drain_timeout_follows_the_grace_period() {
    let mut w = worker();
    w.spec
        .template
        .spec
        .as_mut()
        .unwrap()
        .termination_grace_period_seconds = Some(120);
    let d = render(&w).unwrap();
    let vars = env_of(&d.spec.unwrap().template.spec.unwrap().containers[0]);
    assert_eq!(vars[env::DRAIN_TIMEOUT].value.as_deref(), Some("113s"));
}

#[test]
fn recycle_max_jobs_reaches_the_runtime_only_when_set() {
    assert!(!env_of(&main_container(&worker())).contains_key(env::MAX_JOBS));
    let mut w = worker();
    w.spec.recycle = Some(serde_yaml::from_str("{maxAge: 1h, maxJobs: 500}").unwrap());
    let vars = env_of(&main_container(&w));
    assert_eq!(vars[env::MAX_JOBS].value.as_deref(), Some("500"));
}

#[test]
fn the_runtime_keeps_running_jobs_in_the_termination_message_file() {
    let c = main_container(&worker());
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        env_of(&c)[env::TERMINATION_MESSAGE_PATH].value.as_deref(),
        Some("/dev/termination-log")
    );
    let mut w = worker();
    w.spec.template.spec.as_mut().unwrap().containers[0].termination_message_path =
        Some("/tmp/last-words".into());
    let c = main_container(&w);
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/tmp/last-words")
    );
    assert_eq!(
        env_of(&c)[env::TERMINATION_MESSAGE_PATH].value.as_deref(),
        Some("/tmp/last-words")
    );
}

#[test]
fn queues_that_keep_results_have_their_workers_store_them() {
    let mut q = queue();
    assert!(!env_of(&main_container_for(&worker(), &q)).contains_key(env::STORE_RESULTS));
    q.spec.results = Some(serde_yaml::from_str("{retention: 1h}").unwrap());
    assert_eq!(
        env_of(&main_container_for(&worker(), &q))[env::STORE_RESULTS]
            .value
            .as_deref(),
        Some("true")
    );
    assert!(!env_of(&main_container_for(&worker(), &q)).contains_key(env::RATE_LIMITED));
    q.spec.rate_limit = Some(50);
    assert_eq!(
        env_of(&main_container_for(&worker(), &q))[env::RATE_LIMITED]
            .value
            .as_deref(),
        Some("true")
    );
}

#[test]
fn a_pod_runs_no_more_jobs_than_the_concurrency_limit() {
    let mut q = queue();
    let mut w = worker();
    w.spec.concurrency = 8;
    let concurrency = |q: &JobQueue| {
        env_of(&main_container_for(&w, q))[env::CONCURRENCY]
            .value
            .clone()
            .unwrap_or_default()
    };
    assert_eq!(concurrency(&q), "8");
    q.spec.concurrency_limit = Some(20);
    assert_eq!(concurrency(&q), "8", "a higher limit changes nothing");
    q.spec.concurrency_limit = Some(3);
    assert_eq!(concurrency(&q), "3");
}

#[test]
fn queue_secrets_are_mounted_never_put_in_env() {
    let mut q = queue();
    q.spec.nats = Some(conveyor_crds::NatsConnection {
        url: "tls://nats.messaging:4222".into(),
        credentials_secret: Some("queue-creds".into()),
        tls_secret: Some("queue-tls".into()),
    });
    let w = worker();
    let d = build(
        &w,
        Inputs {
            queue: &q,
            worker_image: IMAGE,
            default_nats_url: "nats://nats:4222",
            replicas: 1,
            identity: None,
        },
    )
    .unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let volumes = pod.volumes.unwrap();
    let secret_of = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(
        secret_of(NATS_CREDENTIALS_VOLUME).as_deref(),
        Some("queue-creds")
    );
    assert_eq!(secret_of(NATS_TLS_VOLUME).as_deref(), Some("queue-tls"));
    let main = &pod.containers[0];
    let mounts = main.volume_mounts.as_ref().unwrap();
    for (volume, path) in [
        (NATS_CREDENTIALS_VOLUME, NATS_CREDENTIALS_MOUNT),
        (NATS_TLS_VOLUME, NATS_TLS_MOUNT),
    ] {
        let mount = mounts.iter().find(|m| m.name == volume).unwrap();
        assert_eq!(mount.mount_path, path);
        assert_eq!(mount.read_only, Some(true));
    }
    let envs = main.env.as_ref().unwrap();
    let get = |name: &str| {
        envs.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        get(conveyor::connect::env::NATS_CREDENTIALS_DIR).as_deref(),
        Some(NATS_CREDENTIALS_MOUNT)
    );
    assert_eq!(
        get(conveyor::connect::env::NATS_TLS_DIR).as_deref(),
        Some(NATS_TLS_MOUNT)
    );
    assert_eq!(
        get(env::NATS_URL).as_deref(),
        Some("tls://nats.messaging:4222")
    );
}

#[test]
fn userinfo_never_reaches_the_deployment() {
    let w = worker();
    let d = build(
        &w,
        Inputs {
            queue: &queue(),
            worker_image: IMAGE,
            default_nats_url: "nats://alice:hunter2@nats:4222",
            replicas: 1,
            identity: None,
        },
    )
    .unwrap();
    let text = serde_json::to_string(&d).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("nats://nats:4222"), "{text}");
}

#[test]
fn http_mode_runs_the_runtime_beside_the_users_server() {
    let server = with_handler(
        worker(),
        HandlerSpec {
            mode: HandlerMode::Http,
            command: None,
            url: Some("http://127.0.0.1:8000/jobs".into()),
        },
    );
    let original = server.spec.template.spec.clone().unwrap().containers[0].clone();
    let pod = render(&server)
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert_eq!(pod.containers.len(), 2);
    assert_eq!(
        pod.containers[0], original,
        "the user's server runs as its image and command say"
    );
    assert!(pod.init_containers.unwrap_or_default().is_empty());
    let runtime = &pod.containers[1];
    assert_eq!(runtime.name, RUNTIME_CONTAINER);
    assert_eq!(runtime.image.as_deref(), Some(IMAGE));
    assert_eq!(
        runtime.command.as_deref(),
        Some(&[RUNTIME_IN_IMAGE.to_owned(), "run".to_owned()][..])
    );
    let vars = env_of(runtime);
    assert_eq!(vars[env::HANDLER_MODE].value.as_deref(), Some("http"));
    assert_eq!(
        vars[env::HANDLER_URL].value.as_deref(),
        Some("http://127.0.0.1:8000/jobs")
    );
    assert!(runtime.readiness_probe.is_some());
    let no_url = with_handler(
        worker(),
        HandlerSpec {
            mode: HandlerMode::Http,
            command: None,
            url: None,
        },
    );
    assert_eq!(render(&no_url).unwrap_err(), BuildError::NoUrl);
}

#[test]
fn a_signed_identity_replaces_the_queue_credentials_and_rolls_the_pods_when_renewed() {
    let mut q = queue();
    q.spec.nats = Some(conveyor_crds::NatsConnection {
        url: "tls://nats.messaging:4222".into(),
        credentials_secret: Some("queue-creds".into()),
        tls_secret: Some("queue-tls".into()),
    });
    let w = worker();
    let identity = crate::worker::identity::Identity {
        secret: "hello-nats-creds".into(),
        inbox_prefix: "_INBOX_uid-1".into(),
        expires_at: 2_000,
        renew_at: 1_500,
    };
    let render = |identity: &crate::worker::identity::Identity| {
        build(
            &w,
            Inputs {
                queue: &q,
                worker_image: IMAGE,
                default_nats_url: "nats://nats:4222",
                replicas: 1,
                identity: Some(identity),
            },
        )
        .unwrap()
        .spec
        .unwrap()
        .template
    };
    let template = render(&identity);
    let pod = template.spec.clone().unwrap();
    let secret_of = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(
        secret_of(NATS_CREDENTIALS_VOLUME).as_deref(),
        Some("hello-nats-creds")
    );
    assert_eq!(secret_of(NATS_TLS_VOLUME).as_deref(), Some("queue-tls"));
    let vars = env_of(&pod.containers[0]);
    assert_eq!(
        vars[conveyor::connect::env::NATS_INBOX_PREFIX]
            .value
            .as_deref(),
        Some("_INBOX_uid-1")
    );
    assert_eq!(
        vars[conveyor::connect::env::NATS_CREDENTIALS_DIR]
            .value
            .as_deref(),
        Some(NATS_CREDENTIALS_MOUNT)
    );
    let expiry = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        t.metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(crate::worker::identity::EXPIRES_ANNOTATION).cloned())
    };
    assert_eq!(expiry(&template).as_deref(), Some("2000"));
    let renewed = crate::worker::identity::Identity {
        expires_at: 3_000,
        ..identity
    };
    assert_ne!(
        render(&renewed),
        template,
        "a new identity changes the pod template"
    );
    let without = main_container_for(&w, &q);
    assert!(
        !env_of(&without).contains_key(conveyor::connect::env::NATS_INBOX_PREFIX),
        "no identity, no prefix"
    );
}
