//! `handler.mode: http` end to end under the test double: the Worker CRD admits it (and refuses
//! it without a `url`), the user's container runs its own web server, the runtime runs beside it
//! and posts each job to the server, and a 2xx answer finishes the job.

mod worker_env;

use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor_crds::{JobQueue, Worker};
use conveyor_testkit::fixtures::Test as _;
use conveyor_testkit::wait_for;
use worker_env::{Env, NS};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn an_http_handler_gets_each_job_as_a_post() {
    let env = Env::start().await;
    env.apply(&JobQueue::test("web").yaml()).await;
    let port = conveyor_testkit::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let server = format!(
        "import http.server as h\n\
         class H(h.BaseHTTPRequestHandler):\n\
         \x20   def do_POST(s):\n\
         \x20       body = s.rfile.read(int(s.headers.get('Content-Length', 0)))\n\
         \x20       open('{seen}', 'ab').write(s.headers['Conveyor-Job-Id'].encode() + b' ' + body + b'\\n')\n\
         \x20       s.send_response(200); s.end_headers(); s.wfile.write(b'done')\n\
         h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n",
        seen = seen.display()
    );
    let worker = Worker::test("web")
        .replicas(1)
        .http(&format!("http://127.0.0.1:{port}/jobs"))
        .image("ghcr.io/conveyor-dev/handler")
        .container_command(&["python3", "-u", "-c", &server])
        .yaml();
    env.apply(&worker).await;
    let queue = QueueRef::new(NS, "web");
    env.wait_stream(&queue.stream()).await;
    let client = conveyor::Client::connect(&env.nats.url()).await.unwrap();
    client
        .submit(&queue, conveyor::Job::new("page-1", "hello"))
        .await
        .unwrap();
    wait_for(DEADLINE, "the server to get the job", || async {
        std::fs::read_to_string(&seen).is_ok_and(|s| s.contains("page-1 hello"))
    })
    .await
    .unwrap();
    wait_for(DEADLINE, "the job finished", || async {
        env.stream_messages(&queue.stream()).await == 0
    })
    .await
    .unwrap();
    env.shutdown().await;
}
