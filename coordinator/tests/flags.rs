//! The `guildhall` binary's flag handling, without a broker: help works,
//! and every bad value is one line on stderr with exit status 2.
//! (Broker-backed tests live in the workspace's `tests/` crate; this file
//! also makes `cargo test` build the binary they spawn.)

use std::process::{Command, Output};

fn guildhall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guildhall"))
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("GUILDHALL_NAMESPACE")
        .env_remove("GUILDHALL_DATA_DIR")
        .output()
        .expect("run guildhall")
}

#[test]
fn help_lists_every_command() {
    let o = guildhall(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in ["serve", "demo", "submit", "status", "trace"] {
        assert!(text.contains(cmd), "{cmd} missing from help:\n{text}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_guildhall"))
        .args(["serve", "--help"])
        .env("AMQP_URL", "amqp://me:s3cret@broker/%2f")
        .output()
        .expect("run guildhall");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("[env: AMQP_URL"), "{text}");
    assert!(
        !text.contains("s3cret"),
        "a secret from the environment shown in help: {text}"
    );
}

#[test]
fn bad_values_are_one_line_and_status_2() {
    for (args, needle) in [
        (vec!["serve", "--listen", "nowhere"], "--listen"),
        (vec!["serve", "--namespace", "a.b"], "--namespace"),
        (vec!["serve", "--amqp-url", "http://x"], "--amqp-url"),
        (
            vec!["serve", "--missed-heartbeats", "0"],
            "--missed-heartbeats",
        ),
        (vec!["demo", "--stream-max-age", "soon"], "--stream-max-age"),
        (vec!["serve", "--data-dir", "/dev/null/data"], "--data-dir"),
        (
            vec!["serve", "--snapshot-interval", "0s"],
            "--snapshot-interval",
        ),
        (vec!["submit", "--stage", "a b"], "--stage"),
        (vec!["submit", "--stage", "a", "--id", "x/y"], "--id"),
    ] {
        let o = guildhall(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_bad_address_in_an_amqp_url_list_shows_no_password() {
    // The list in the environment, as a deployment gives it: before, it
    // was read as one URL and the error line showed the second password.
    for list in [
        "amqp://me:s3cret@node1/%2f,amqp://me:s3cret@node2:bad/%2f",
        "amqp://me:s3cret@node1/%2f,http://me:s3cret@node2/",
        "amqp://me:s3,cret@node1/%2f",
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_guildhall"))
            .args(["submit", "--stage", "a"])
            .env("AMQP_URL", list)
            .env_remove("GUILDHALL_NAMESPACE")
            .output()
            .expect("run guildhall");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{list}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{list}: {err}");
        assert!(err.contains("--amqp-url"), "{err}");
        assert!(!err.contains("s3"), "{list}: {err}");
    }
}
