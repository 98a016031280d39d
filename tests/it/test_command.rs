//! The README's test command (`scripts/test`) on a machine that lacks a
//! prerequisite: one line naming it and how to get it, status 2, before any
//! test starts (never a run of time-outs).

use std::path::PathBuf;
use std::process::Output;

/// Runs `scripts/test --setup-only` with `env` on top of the test's own.
async fn setup_with(env: &[(&str, &str)]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    let mut command = tokio::process::Command::new(root.join("scripts/test"));
    command
        .arg("--setup-only")
        .stdin(std::process::Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().await.expect("run scripts/test")
}

/// Status 2 and exactly one line on stderr, containing `expected`.
fn assert_one_line(out: &Output, expected: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(expected), "{err}");
}

#[tokio::test]
async fn a_broker_that_does_not_answer_is_one_line_naming_it() {
    // The machine's node runs but does not listen there: the URL is wrong,
    // and the script must not try to start a second node.
    let out = setup_with(&[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]).await;
    assert_one_line(&out, "RabbitMQ at 127.0.0.1:1 is needed by the tests");
    assert_one_line(&out, "AMQP_URL");
}

#[tokio::test]
async fn a_broker_without_its_management_api_is_one_line_naming_the_plugins() {
    // `127.1` is this machine's broker under a name the script does not
    // take for a local node (as a remote broker: no plugins to enable).
    let out = setup_with(&[
        ("AMQP_URL", "amqp://guest:guest@127.1:5672/%2f"),
        ("GUILDHALL_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:1"),
    ])
    .await;
    assert_one_line(&out, "the RabbitMQ management API at 127.0.0.1:1");
    assert_one_line(&out, "rabbitmq-plugins enable rabbitmq_management");
}
