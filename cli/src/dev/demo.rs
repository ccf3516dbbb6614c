//! `conveyor dev --demo`: applies `examples/hello/`, waits for the queue and a ready worker pod,
//! submits jobs, waits until every one is processed, and shows what `kubectl` sees. Every wait has
//! the `--timeout` deadline and says what it waited for when it fails.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor::names::QueueRef;
use conveyor::{Client, Job};
use kube::ResourceExt;
use kube::api::DynamicObject;

use super::{DevEnv, Paths, kube as k8s, wait_until};
use crate::args::DevArgs;
use crate::status::{QueueFigures, queue_figures};

/// Runs the demo on a started [`DevEnv`].
pub async fn run(env: &DevEnv, args: &DevArgs, paths: &Paths) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = paths.examples.join("hello");
    let objects = k8s::read_manifests(&dir)?;
    let queue = find(&objects, "JobQueue")
        .next()
        .map(|o| {
            QueueRef::new(
                o.namespace().unwrap_or_else(|| "default".into()),
                o.name_any(),
            )
        })
        .with_context(|| format!("no JobQueue in {}", dir.display()))?;
    let workers: Vec<&DynamicObject> = find(&objects, "Worker").collect();

    step(&format!("applying {}", dir.display()));
    match k8s::kubectl() {
        Some(kubectl) => {
            let dir = dir.to_string_lossy();
            let out = k8s::run_kubectl(&kubectl, &env.kubeconfig, &["apply", "-f", &dir]).await?;
            print!("{out}");
        }
        None => k8s::apply_objects(&env.client, &objects).await?,
    }

    let nats = async_nats::connect(env.nats_url())
        .await
        .context("cannot connect to the local NATS")?;
    let js = &async_nats::jetstream::new(nats.clone());
    let queue = &queue;
    step(&format!(
        "waiting for the operator to create queue {}/{} in JetStream",
        queue.namespace, queue.name
    ));
    let before = wait_until(args.timeout, "the queue's stream", || async move {
        Ok(queue_figures(js, queue).await.ok())
    })
    .await;
    let before = match before {
        Ok(figures) => figures,
        Err(e) => {
            let story = k8s::queue_story(&env.client, &queue.namespace, &queue.name).await;
            bail!("{e:#}\n  {story}");
        }
    };

    for worker in &workers {
        let namespace = worker.namespace().unwrap_or_else(|| "default".into());
        let name = worker.name_any();
        let min_replicas = worker
            .data
            .pointer("/spec/scaling/minReplicas")
            .and_then(|v| v.as_i64());
        if min_replicas == Some(0) {
            continue;
        }
        step(&format!(
            "waiting for a Ready pod of Worker {namespace}/{name}"
        ));
        let (client, namespace, name) = (&env.client, namespace.as_str(), name.as_str());
        let ready = wait_until(
            args.timeout,
            &format!("a Ready pod of Worker {namespace}/{name}"),
            || async move {
                Ok((k8s::worker_ready_replicas(client, namespace, name).await? >= 1).then_some(()))
            },
        )
        .await;
        if let Err(e) = ready {
            bail!("{e:#}\n  {}", k8s::pods_story(client, namespace).await);
        }
    }

    let total = args.demo_jobs;
    step(&format!(
        "submitting {total} jobs to {}/{}",
        queue.namespace, queue.name
    ));
    let client = Client::new(nats);
    let jobs = (1..=total).map(|i| Job::with_random_id(format!("{{\"name\": \"job {i}\"}}")));
    let results = client.submit_batch(queue, jobs).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = refused.first() {
        bail!("{} of {total} jobs refused; first: {first}", refused.len());
    }

    step("waiting until every job is processed");
    let processing = Instant::now();
    let last_report = &Cell::new(Instant::now());
    let before_ref = &before;
    let after = wait_until(
        args.timeout,
        &format!("{total} jobs to be processed"),
        || async move {
            let now = queue_figures(js, queue).await?;
            let left = now.pending + now.in_flight;
            if last_report.get().elapsed() >= Duration::from_secs(1) {
                eprintln!(
                    "  {} processed, {left} to go",
                    processed(total, before_ref, &now)
                );
                last_report.set(Instant::now());
            }
            Ok((left == 0).then_some(now))
        },
    )
    .await?;
    let took = processing.elapsed();

    step("kubectl get jobqueues,workers");
    match k8s::kubectl() {
        Some(kubectl) => {
            let ns = queue.namespace.as_str();
            let out = k8s::run_kubectl(
                &kubectl,
                &env.kubeconfig,
                &["get", "jobqueues,workers", "-n", ns],
            )
            .await?;
            print!("{out}");
        }
        None => println!("(kubectl is not on PATH; `conveyor status` figures below)"),
    }
    print!("{}", crate::status::table(std::slice::from_ref(&after)));

    let dead = after.dead_lettered.saturating_sub(before.dead_lettered);
    let done = processed(total, &before, &after);
    println!(
        "\ndemo: {done} of {total} jobs processed in {took:.1?} ({:.0} jobs/s), {dead} dead-lettered; {:.1?} in all",
        done as f64 / took.as_secs_f64().max(0.001),
        started.elapsed()
    );
    if done != total {
        bail!(
            "{} of {total} jobs were not processed ({dead} dead-lettered)",
            total - done
        );
    }
    Ok(())
}

/// The objects of one kind.
fn find<'a>(
    objects: &'a [DynamicObject],
    kind: &'a str,
) -> impl Iterator<Item = &'a DynamicObject> {
    objects
        .iter()
        .filter(move |o| o.types.as_ref().is_some_and(|t| t.kind == kind))
}

/// Jobs of this run done: neither waiting, in flight, nor newly dead-lettered.
fn processed(total: u64, before: &QueueFigures, now: &QueueFigures) -> u64 {
    let dead = now.dead_lettered.saturating_sub(before.dead_lettered);
    total.saturating_sub(now.pending + now.in_flight + dead)
}

/// Announces a step of the demo.
fn step(what: &str) {
    eprintln!("==> {what}");
}
