//! The hello example's handler (`examples/hello/image/handler.sh`) greets the name of the
//! README's JSON payload (`{"name": "world"}` gave `Hello, {"name": "world"}!`) and still
//! greets a plain-text payload as it is.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn greet(payload: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/image/handler.sh");
    let mut child = Command::new("sh")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{payload:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_readme_payload_greets_its_name() {
    assert_eq!(greet(r#"{"name": "world"}"#), "Hello, world!\n");
    assert_eq!(greet(r#"{"name":"Ada","lang":"en"}"#), "Hello, Ada!\n");
    assert_eq!(greet("job 7"), "Hello, job 7!\n");
    assert_eq!(greet(""), "Hello, world!\n");
    assert_eq!(greet(r#"{"count": 3}"#), "Hello, world!\n");
}
