//! The web dashboard on its own port, against the real operator (in-process, Kubernetes test
//! double's API server, a real `nats-server`) with a seeded queue: an in-process SDK worker
//! completes `ok-*` jobs and dead-letters `bad-*` ones, and one job waits for an hour. The
//! pages and the API answer with the figures of the queue's status, every answer is small,
//! dead letters are paged, shown, requeued (and seen completing) and purged with the token, and
//! a write without the token or from another site is refused. The browser test drives the
//! same fixture with Debian's chromium through npm's playwright-core
//! (`tests/browser/dashboard.mjs`, installed by `make deps`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_operator::config::Token;
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::kubectl::Kubectl;
use conveyor_testkit::{NatsServer, wait_for};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const NS: &str = "team";
const TOKEN: &str = "s3cret-token";
/// Largest answer the dashboard may give (issue #13: every page and call under 300 KB).
const MAX_ANSWER: usize = 300 * 1024;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) {
    Kubectl::new(cluster.kubeconfig_path())
        .ok(args, stdin)
        .await;
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request to the dashboard (HTTP/1.1, `Connection: close`); `headers` are extra lines.
async fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the dashboard listens");
    let mut text =
        format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        text.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "answers carry a length: {head}"
    );
    let answer = Answer {
        status,
        content_type,
        body: body.to_owned(),
    };
    assert!(
        answer.body.len() < MAX_ANSWER,
        "{path} answered {} bytes",
        answer.body.len()
    );
    answer
}

async fn get(port: u16, path: &str) -> Answer {
    request(port, "GET", path, &[]).await
}

/// The seeded environment: a queue `emails` (results kept) with 1 completed job, 3 dead
/// letters (`bad-1..3`) and 1 delayed job; a queue `reports`; a Worker `emails`; the dashboard
/// with a token. `bad-*` jobs complete once `fixed` is set.
struct Seeded {
    cluster: DevCluster,
    nats: NatsServer,
    port: u16,
    fixed: Arc<AtomicBool>,
    stop: CancellationToken,
    operator: tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>,
    worker: tokio::task::JoinHandle<()>,
}

/// Two queues (`emails` keeps results an hour and never retries) and the Worker of `emails`.
fn queues() -> String {
    [
        JobQueue::test("emails")
            .max_attempts(1)
            .result_retention("1h")
            .yaml(),
        JobQueue::test("reports").yaml(),
        Worker::test("emails")
            .concurrency(4)
            .jsonl(&["handler"])
            .image("example/handler")
            .yaml(),
    ]
    .join("---\n")
}

impl Seeded {
    async fn start() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let cluster = DevCluster::start(Options::api_only()).await.unwrap();
        for crd in ["crds/jobqueues.yaml", "crds/workers.yaml"] {
            let path = repo(crd);
            kubectl(&cluster, &["apply", "-f", path.to_str().unwrap()], None).await;
        }
        kubectl(&cluster, &["create", "namespace", NS], None).await;
        let nats = NatsServer::start().await.unwrap();
        let port = conveyor_testkit::free_port().unwrap();
        let mut config = Config::with_nats_url(nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.dashboard_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
        config.dashboard_token = Some(Token(TOKEN.into()));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let operator = tokio::spawn(conveyor_operator::run_with_client(
            config,
            cluster.client(),
            async move { stopped.cancelled().await },
        ));
        kubectl(&cluster, &["apply", "-n", NS, "-f", "-"], Some(&queues())).await;

        let client = conveyor::Client::connect(&nats.url()).await.unwrap();
        let js = client.jetstream().clone();
        let emails = QueueRef::new(NS, "emails");
        wait_for(DEADLINE, "the streams of emails", || async {
            let streams = [
                emails.stream(),
                emails.dead_letter_stream(),
                emails.results_stream(),
                emails.delayed_stream(),
            ];
            for stream in streams {
                if js.get_stream(stream).await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap();

        let fixed = Arc::new(AtomicBool::new(false));
        let worker = {
            let fixed = fixed.clone();
            let stop = stop.clone();
            let options = conveyor::worker::WorkerOptions {
                poll_wait: Duration::from_millis(200),
                store_results: true,
                ..Default::default()
            };
            let runner = conveyor::Worker::new(js.clone(), emails.clone())
                .options(options)
                .handler(move |job: conveyor::ReceivedJob| {
                    let fixed = fixed.load(Ordering::Relaxed);
                    async move {
                        if job.id.starts_with("bad-") && !fixed {
                            conveyor::Outcome::Permanent(format!("card declined for {}", job.id))
                        } else {
                            let mut result = b"sent:".to_vec();
                            result.extend_from_slice(&job.payload);
                            conveyor::Outcome::Done(result.into())
                        }
                    }
                })
                .run(async move { stop.cancelled().await });
            tokio::spawn(async move {
                runner.await.expect("the worker runs");
            })
        };
        for id in ["ok-1", "bad-1", "bad-2", "bad-3"] {
            let job = conveyor::Job::new(id, format!("{{\"to\":\"{id}@example.com\"}}"));
            client.submit(&emails, job).await.unwrap();
        }
        let later = conveyor::Job::new("later-1", "{}").delay(Duration::from_secs(3600));
        client.submit(&emails, later).await.unwrap();

        let seeded = Self {
            cluster,
            nats,
            port,
            fixed,
            stop,
            operator,
            worker,
        };
        // The figures reach the dashboard through the queue's status.
        seeded
            .wait_queue("emails", "3 dead letters, 1 delayed, none pending", |q| {
                q["deadLettered"] == 3 && q["delayed"] == 1 && q["pending"] == 0
            })
            .await;
        seeded
    }

    /// Waits until the dashboard lists queue `name` as `check` wants.
    async fn wait_queue(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) {
        let port = self.port;
        wait_for(DEADLINE, what, || async {
            let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            drop(stream);
            let answer = get(port, &format!("/api/queues/{NS}/{name}")).await;
            answer.status == 200 && check(&answer.json())
        })
        .await
        .unwrap();
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.worker.await.unwrap();
        tokio::time::timeout(DEADLINE, self.operator)
            .await
            .expect("operator stops")
            .unwrap()
            .expect("operator exits cleanly");
        self.cluster.shutdown().await;
    }
}

#[tokio::test]
async fn the_dashboard_shows_queues_workers_dead_letters_and_jobs_and_guards_its_writes() {
    let fx = Seeded::start().await;
    let port = fx.port;

    // The page and its assets, compiled into the binary.
    let page = get(port, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.body.contains("/assets/app.js"), "{}", page.body);
    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
    ] {
        let asset = get(port, path).await;
        assert_eq!(asset.status, 200, "{path}");
        assert!(asset.content_type.starts_with(kind), "{path}: {asset:?}");
    }
    // A name that resolves to the dashboard (DNS rebinding) is not answered.
    let rebound = request(port, "GET", "/api/queues", &[("Host", "evil.example:80")]).await;
    assert_eq!(rebound.status, 403, "{rebound:?}");
    let info = get(port, "/api/info").await.json();
    assert_eq!(info["writable"], true);
    assert_eq!(info["running"], true);

    // Queues from their status, in name order, paged with a cursor.
    let queues = get(port, "/api/queues").await.json();
    assert_eq!(queues["total"], 2);
    let emails = &queues["items"][0];
    assert_eq!(emails["name"], "emails");
    assert_eq!(emails["deadLettered"], 3);
    assert_eq!(emails["delayed"], 1);
    assert_eq!(emails["inFlight"], 0);
    let ready = emails["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready["status"], "True");
    let first = get(port, "/api/queues?limit=1").await.json();
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    assert_eq!(first["next"], format!("{NS}/emails"));
    let second = get(port, &format!("/api/queues?limit=1&after={NS}/emails")).await;
    let second = second.json();
    assert_eq!(second["items"][0]["name"], "reports");
    assert!(second["next"].is_null());
    let detail = get(port, &format!("/api/queues/{NS}/emails")).await.json();
    let failures = detail["recentFailures"].as_array().unwrap();
    assert_eq!(failures.len(), 3, "{detail}");
    assert!(
        failures[0]["error"]
            .as_str()
            .unwrap()
            .contains("card declined")
    );
    assert_eq!(
        get(port, &format!("/api/queues/{NS}/nope")).await.status,
        404
    );

    // Workers from their status.
    let workers = get(port, "/api/workers").await.json();
    assert_eq!(workers["total"], 1);
    assert_eq!(workers["items"][0]["queue"], "emails");
    assert_eq!(workers["items"][0]["concurrency"], 4);

    // Dead letters, one page at a time.
    let base = format!("/api/queues/{NS}/emails/dead-letters");
    let page = get(port, &format!("{base}?limit=2")).await.json();
    let items = page["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|d| d["jobId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["bad-1", "bad-2"]);
    let next = page["next"].as_u64().expect("a next page");
    let rest = get(port, &format!("{base}?limit=2&from={next}"))
        .await
        .json();
    assert_eq!(rest["items"][0]["jobId"], "bad-3");
    assert!(rest["next"].is_null());
    assert_eq!(
        get(port, &format!("{base}?limit=1000000")).await.status,
        200,
        "a huge limit is capped, not refused"
    );

    // One dead letter with its payload and headers.
    let sequence = items[0]["sequence"].as_u64().unwrap();
    let letter = get(port, &format!("{base}/{sequence}")).await.json();
    assert_eq!(letter["jobId"], "bad-1");
    assert_eq!(letter["reason"], "permanent");
    assert!(letter["error"].as_str().unwrap().contains("card declined"));
    assert_eq!(letter["payload"]["text"], "{\"to\":\"bad-1@example.com\"}");
    assert!(
        letter["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "Conveyor-Error"),
        "{letter}"
    );
    assert_eq!(get(port, &format!("{base}/999999")).await.status, 404);

    // Where is job X?
    let jobs = format!("/api/queues/{NS}/emails/jobs");
    let ok = get(port, &format!("{jobs}/ok-1")).await.json();
    assert_eq!(ok["state"], "completed");
    assert_eq!(ok["result"]["text"], "sent:{\"to\":\"ok-1@example.com\"}");
    let bad = get(port, &format!("{jobs}/bad-2")).await.json();
    assert_eq!(bad["state"], "deadLettered");
    assert!(bad["error"].as_str().unwrap().contains("card declined"));
    let later = get(port, &format!("{jobs}/later-1")).await.json();
    assert_eq!(later["state"], "delayed");
    assert!(
        later["delayedUntil"].as_str().unwrap().starts_with("@at "),
        "{later}"
    );
    let missing = get(port, &format!("{jobs}/nobody")).await.json();
    assert_eq!(missing["state"], "notFound");
    assert_eq!(missing["checked"].as_array().unwrap().len(), 2, "{missing}");
    assert!(
        missing["notChecked"]
            .as_str()
            .unwrap()
            .contains("pending and running")
    );

    // Writes: refused without the token, with a wrong one, and from another site.
    let requeue = format!("{base}/{sequence}/requeue");
    let bearer = format!("Bearer {TOKEN}");
    let refusals: [&[(&str, &str)]; 4] = [
        &[],
        &[("Authorization", "Bearer wrong")],
        &[
            ("Authorization", &bearer),
            ("Origin", "http://evil.example"),
        ],
        &[("Authorization", &bearer), ("Sec-Fetch-Site", "cross-site")],
    ];
    for headers in refusals {
        let refused = request(port, "POST", &requeue, headers).await;
        assert_eq!(refused.status, 403, "{headers:?}: {refused:?}");
        assert!(!refused.json()["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        get(port, &format!("{base}?limit=50")).await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "refused writes changed nothing"
    );

    // With the token from the dashboard's own page: requeued, and this time it completes.
    fx.fixed.store(true, Ordering::Relaxed);
    let origin = format!("http://127.0.0.1:{port}");
    let same_site = [
        ("Authorization", bearer.as_str()),
        ("Origin", origin.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let done = request(port, "POST", &requeue, &same_site).await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json()["jobs"], serde_json::json!(["bad-1"]));
    wait_for(DEADLINE, "bad-1 completing after its requeue", || async {
        get(port, &format!("{jobs}/bad-1")).await.json()["state"] == "completed"
    })
    .await
    .unwrap();

    // Purge one.
    let bad2 = items[1]["sequence"].as_u64().unwrap();
    let purged = request(port, "POST", &format!("{base}/{bad2}/purge"), &same_site).await;
    assert_eq!(purged.status, 200, "{purged:?}");
    let left = get(port, &base).await.json();
    let left: Vec<&str> = left["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["jobId"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["bad-3"]);
    fx.wait_queue("emails", "1 dead letter left", |q| q["deadLettered"] == 1)
        .await;

    fx.shutdown().await;
}

/// Where the browser test saves its screenshots (one per page; docs/dashboard/ has copies).
const SCREENSHOTS: &str = "target/dashboard-screenshots";

#[tokio::test]
async fn a_browser_sees_the_figures_opens_and_requeues_a_dead_letter_and_finds_a_job() {
    // CI installs both (`make deps`); a missing one is a failure, not a skip.
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no chromium at {chromium}: run `make deps` (scripts/install-deps.sh installs Debian's chromium)"
    );
    assert!(
        repo("tests/browser/node_modules/playwright-core").is_dir(),
        "no playwright-core in tests/browser/node_modules: run `make deps`"
    );
    let fx = Seeded::start().await;
    // The page's requeue of bad-1 then completes.
    fx.fixed.store(true, Ordering::Relaxed);
    let url = format!("http://127.0.0.1:{}/", fx.port);
    let run = tokio::process::Command::new("node")
        .arg(repo("tests/browser/dashboard.mjs"))
        .arg(&url)
        .arg(TOKEN)
        .arg(repo(SCREENSHOTS))
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser test ends within 2 minutes")
        .expect("node runs: install Node.js (`make deps` needs it for playwright-core)");
    assert!(
        out.status.success(),
        "tests/browser/dashboard.mjs failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = format!("/api/queues/{NS}/emails/jobs");
    let port = fx.port;
    wait_for(
        DEADLINE,
        "bad-1 completing after the page's requeue",
        || async { get(port, &format!("{jobs}/bad-1")).await.json()["state"] == "completed" },
    )
    .await
    .unwrap();
    for page in [
        "queues",
        "workers",
        "queue",
        "dead-letters",
        "dead-letter",
        "job",
    ] {
        let shot = repo(SCREENSHOTS).join(format!("{page}.png"));
        assert!(shot.is_file(), "a screenshot of {page}: {}", shot.display());
    }
    fx.shutdown().await;
}

/// Pending jobs are peeked a page at a time per priority level (and say whether a worker took
/// them), delayed jobs show when they run, and dead letters are requeued or purged by what
/// their error says, one bounded page per request.
#[tokio::test]
async fn pending_and_delayed_jobs_are_paged_and_dead_letters_move_by_their_error() {
    let fx = Seeded::start().await;
    let port = fx.port;
    let client = conveyor::Client::connect(&fx.nats.url()).await.unwrap();
    // `reports` has no worker: what is submitted stays pending.
    let reports = QueueRef::new(NS, "reports");
    for n in 0..5 {
        let job = conveyor::Job::new(format!("r-{n}"), "{}");
        client.submit(&reports, job).await.unwrap();
    }
    // A job that waits for one that never comes is counted as waiting, not pending.
    let never = conveyor::flow::JobRef::new(NS, "reports", "never-submitted");
    let dependent =
        conveyor::Job::new("after-never", "{}").after(conveyor::flow::Dependency::on(never));
    client.submit(&reports, dependent).await.unwrap();
    fx.wait_queue("reports", "1 waiting, 5 pending", |q| {
        q["waiting"] == 1 && q["pending"] == 5
    })
    .await;
    // A worker takes r-0 and holds it: delivered, the others not.
    let consumer: async_nats::jetstream::consumer::PullConsumer = client
        .jetstream()
        .get_consumer_from_stream(reports.consumer(0), reports.stream())
        .await
        .unwrap();
    let held = conveyor_testkit::take(&consumer, 1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let pending = format!("/api/queues/{NS}/reports/pending");
    let mut seen = Vec::new();
    let mut path = format!("{pending}?limit=2");
    let mut pages = 0;
    loop {
        let page = get(port, &path).await;
        assert_eq!(page.status, 200, "{page:?}");
        let page = page.json();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2, "a page holds at most its limit: {page}");
        for item in items {
            assert_eq!(
                item["delivered"],
                item["jobId"] == "r-0",
                "only r-0 was taken: {item}"
            );
            seen.push(item["jobId"].as_str().unwrap().to_owned());
        }
        pages += 1;
        match page["next"].as_u64() {
            Some(next) => path = format!("{pending}?limit=2&from={next}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["r-0", "r-1", "r-2", "r-3", "r-4"],
        "oldest first, each once"
    );
    assert_eq!(pages, 3);
    drop(held);
    let no_level = get(port, &format!("{pending}?level=1")).await;
    assert_eq!(no_level.status, 400, "{no_level:?}");
    assert!(
        no_level.body.contains("priority levels 0 to 0"),
        "{no_level:?}"
    );
    // Malformed queries are refused before anything is read.
    for bad in [
        format!("{pending}?level=300"),
        format!("{pending}?from=-1"),
        format!("{pending}?limit=many"),
        format!("/api/queues/{NS}/emails/delayed?from=1e9"),
    ] {
        assert_eq!(get(port, &bad).await.status, 400, "{bad}");
    }
    let unknown = get(port, &format!("/api/queues/{NS}/nosuch/history")).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");

    let delayed = get(port, &format!("/api/queues/{NS}/emails/delayed"))
        .await
        .json();
    let items = delayed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{delayed}");
    assert_eq!(items[0]["jobId"], "later-1");
    assert!(
        items[0]["runAt"].as_str().unwrap().starts_with("@at "),
        "{delayed}"
    );

    // Bulk writes: refused without the token and from another site.
    let bulk = format!("/api/queues/{NS}/emails/dead-letters/all");
    let refused = request(port, "POST", &format!("{bulk}/purge"), &[]).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let cross_site = [
        ("Authorization", bearer.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let refused = request(port, "POST", &format!("{bulk}/purge"), &cross_site).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let no_action = request(port, "POST", &format!("{bulk}/delete"), &auth).await;
    assert_eq!(no_action.status, 404, "{no_action:?}");
    let bad_until = request(port, "POST", &format!("{bulk}/purge?until=soon"), &auth).await;
    assert_eq!(bad_until.status, 400, "{bad_until:?}");

    // 150 more failing jobs' dead letters: 153 in all, more than one step of 100.
    let emails = QueueRef::new(NS, "emails");
    let js = client.jetstream();
    let extra = (0..150).map(|n| {
        conveyor_testkit::dead_letters::Letter::of(&emails, &format!("bad-x-{n}"))
            .error("card declined")
    });
    conveyor_testkit::dead_letters::publish(js, extra)
        .await
        .unwrap();
    fx.wait_queue("emails", "153 dead letters", |q| q["deadLettered"] == 153)
        .await;
    let step = |query: String| {
        let path = format!("{bulk}/requeue?{query}");
        async move {
            let answer = request(port, "POST", &path, &auth).await;
            assert_eq!(answer.status, 200, "{answer:?}");
            answer.json()
        }
    };
    let first = step(String::new()).await;
    assert_eq!(first["jobs"].as_array().unwrap().len(), 100, "{first}");
    let (next, until) = (
        first["next"].as_u64().unwrap(),
        first["until"].as_u64().unwrap(),
    );
    // The requeued jobs fail again (the fix is not in yet) and come back as new dead letters,
    // after the sequence the action started at.
    wait_for(DEADLINE, "the 100 dead-lettered again", || async {
        let mut dlq = js.get_stream(emails.dead_letter_stream()).await.unwrap();
        let state = dlq.info().await.unwrap().state.clone();
        state.last_sequence >= until + 100 && state.messages == 153
    })
    .await
    .unwrap();
    let second = step(format!("from={next}&until={until}")).await;
    assert_eq!(second["jobs"].as_array().unwrap().len(), 53, "{second}");
    assert!(
        second["next"].is_null(),
        "the action ends where the stream ended when it began, not at its own output: {second}"
    );
    fx.wait_queue("emails", "all 153 dead-lettered again", |q| {
        q["deadLettered"] == 153
    })
    .await;

    // A purge by error text, paged to the end: exactly the one it names.
    let mut purged = Vec::new();
    let mut query = "match=BAD-2".to_owned();
    loop {
        let path = format!("{bulk}/purge?{query}");
        let answer = request(port, "POST", &path, &auth).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let answer = answer.json();
        purged.extend(answer["jobs"].as_array().unwrap().iter().cloned());
        match answer["next"].as_u64() {
            Some(next) => query = format!("match=BAD-2&from={next}&until={}", answer["until"]),
            None => break,
        }
    }
    assert_eq!(purged, [serde_json::json!("bad-2")]);

    // Fixed: requeue all, and they complete.
    fx.fixed.store(true, Ordering::Relaxed);
    let mut requeued = 0;
    let mut query = String::new();
    loop {
        let answer = step(query).await;
        requeued += answer["jobs"].as_array().unwrap().len();
        match answer["next"].as_u64() {
            Some(next) => query = format!("from={next}&until={}", answer["until"]),
            None => break,
        }
    }
    assert_eq!(requeued, 152);
    let jobs = format!("/api/queues/{NS}/emails/jobs");
    for id in ["bad-1", "bad-3"] {
        wait_for(DEADLINE, "the requeued job completing", || async {
            get(port, &format!("{jobs}/{id}")).await.json()["state"] == "completed"
        })
        .await
        .unwrap();
    }
    fx.wait_queue("emails", "no dead letter left", |q| q["deadLettered"] == 0)
        .await;
    fx.shutdown().await;
}
