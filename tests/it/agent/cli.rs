//! The real `guildhall-agent` binary refuses bad flags and an unreachable
//! broker with one line on stderr and the right exit status, never a panic.

use guildhall_tests::bin;
use std::process::{Command, Output};

/// Runs the binary with `args` and `env`, clear of the caller's agent settings.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("guildhall-agent"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("GUILDHALL_") || key == "AMQP_URL" || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the agent binary runs")
}

/// Asserts exactly one line on stderr starting with `expected`, and the status.
fn assert_one_line(output: &Output, status: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    let line = stderr.trim_end();
    let expected = format!("guildhall-agent: error: {expected}");
    assert!(
        line.starts_with(&expected),
        "{line:?} does not start with {expected:?}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn bad_flags_give_one_line_and_status_2() {
    for (args, expected) in [
        (
            &["--stage", "s", "--exec", "cat", "--concurrency", "0"][..],
            "--concurrency must be between 1 and 1024 (got 0)",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--concurrency", "2000"],
            "--concurrency must be between 1 and 1024 (got 2000)",
        ),
        (&["--exec", "cat"], "--stage is required"),
        (
            &["--stage", "s"],
            "one of --worker-url, --exec or --simulate is required",
        ),
        (
            &[
                "--stage",
                "s",
                "--exec",
                "cat",
                "--worker-url",
                "http://127.0.0.1:9/",
            ],
            "only one of --worker-url, --exec or --simulate may be given",
        ),
        (
            &["--stage", "no/slash", "--exec", "cat"],
            "--stage: invalid stage",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--max-attempts", "0"],
            "--max-attempts must be between 1 and 10000 (got 0)",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--heartbeat", "5m"],
            "--heartbeat must be between 100ms and 1m (got 5m)",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--retry-delay", "quickly"],
            "--retry-delay: invalid duration \"quickly\"",
        ),
        (
            &["--stage", "s", "--simulate", "median=1s,bogus=2"],
            "--simulate: unknown key \"bogus\"",
        ),
        (
            &["--stage", "s", "--worker-url", "not a url"],
            "--worker-url: \"not a url\" is not a URL",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--amqp-url", "http://h/"],
            "--amqp-url: invalid AMQP URL",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--concurrency", "lots"],
            "invalid value 'lots' for '--concurrency <CONCURRENCY>'",
        ),
        (
            &["--stage", "s", "--exec", "cat", "--frobnicate"],
            "unexpected argument '--frobnicate'",
        ),
        (
            &["--stages", "a>b,a", "--exec", "cat"],
            "--stages: stage \"a\" is listed twice",
        ),
        (
            &["--stage", "c", "--stages", "a,b", "--exec", "cat"],
            "--stage: \"c\" is not one of --stages (a, b)",
        ),
    ] {
        let output = run(args, &[]);
        assert_one_line(&output, 2, expected);
    }
}

#[test]
fn flags_are_read_from_the_environment_too() {
    let output = run(
        &[],
        &[
            ("GUILDHALL_STAGE", "s"),
            ("GUILDHALL_EXEC", "cat"),
            ("GUILDHALL_CONCURRENCY", "0"),
        ],
    );
    assert_one_line(
        &output,
        2,
        "--concurrency must be between 1 and 1024 (got 0)",
    );
}

#[test]
fn the_stage_list_is_read_from_the_environment_too() {
    let output = run(&["--exec", "cat"], &[("GUILDHALL_STAGES", "a>b,b>")]);
    assert_one_line(
        &output,
        2,
        "--stages: \"b>\" names no stage after '>' (write \"b\" alone to end the pipeline there)",
    );
}

#[test]
fn an_unreachable_broker_gives_one_line_and_status_1_without_the_password() {
    let output = run(
        &[
            "--stage",
            "s",
            "--exec",
            "cat",
            "--amqp-url",
            "amqp://guest:secret@127.0.0.1:1/%2f",
        ],
        &[],
    );
    assert_one_line(
        &output,
        1,
        "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f: ",
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("secret"));
}

#[test]
fn help_and_version_exit_0() {
    let help = run(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--worker-url",
        "--exec",
        "--simulate",
        "GUILDHALL_CONCURRENCY",
        "--stages",
        "GUILDHALL_STAGES",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    let version = run(&["--version"], &[]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}
