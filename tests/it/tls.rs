//! TLS to the broker: `amqps://` with a private CA (and a client
//! certificate) for both binaries, the management API over https, against a
//! private RabbitMQ node whose only listeners are TLS; and what a wrong CA,
//! a missing client certificate, or a bad CA file gets.

use guildhall_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// A broker password that must never show in any output.
const SECRET: &str = "hunter2";

/// Runs `program` with `args` (no broker or TLS settings from the
/// environment), at most `timeout`.
async fn run(program: &str, args: &[&str], timeout: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(bin(program));
    cmd.args(args).kill_on_drop(true);
    // What a user sees: the binaries' own log filters.
    for var in [
        "RUST_LOG",
        "AMQP_URL",
        "GUILDHALL_NAMESPACE",
        "GUILDHALL_AMQP_CA_FILE",
        "GUILDHALL_AMQP_CERT_FILE",
        "GUILDHALL_AMQP_KEY_FILE",
        "GUILDHALL_MANAGEMENT_URL",
        "GUILDHALL_MANAGEMENT_CA_FILE",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} still running after {timeout:?}"))
        .expect("run the binary");
    (out, started.elapsed())
}

/// The error line of a failed run: exactly one line on stderr, the
/// password nowhere.
fn error_line(program: &str, args: &[&str], out: &Output, status: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(status),
        "{program} {args:?}: stderr {stderr} stdout {stdout}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{program} {args:?}: not one line: {stderr}");
    assert!(
        !stderr.contains(SECRET) && !stdout.contains(SECRET),
        "{program} {args:?} showed the password: {stderr}"
    );
    lines[0].to_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Bad TLS files and flags are flag errors: one line naming the flag, exit
/// status 2, for every command that connects to the broker. No broker is
/// needed: nothing gets that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_refused_at_start_with_status_2() {
    let ns = TestNs::new("tlsflags");
    let dir = ns.log_dir.join("pki");
    let ca = TestCa::new(&dir, "flags-ca").unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let amqps = format!("amqps://guest:{SECRET}@127.0.0.1:1/%2f");
    let amqp = format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f");
    let https_mgmt = "https://guest:guest@127.0.0.1:1";
    let url_missing_ca = format!("{amqps}?cacertfile={}", s(&missing));
    let url_no_verify = format!("{amqps}?verify=verify_none");
    // (flags, what the line must say)
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--amqp-url", &amqps, "--amqp-ca-file", s(&missing)],
            "--amqp-ca-file",
        ),
        (
            vec!["--amqp-url", &amqps, "--amqp-ca-file", s(&garbage)],
            "holds no PEM certificate",
        ),
        (
            vec!["--amqp-url", &amqps, "--amqp-ca-file", s(&dir)],
            "--amqp-ca-file",
        ),
        (
            vec!["--amqp-url", &amqp, "--amqp-ca-file", s(&ca.cert)],
            "need an amqps:// URL",
        ),
        (
            vec!["--amqp-url", &amqps, "--amqp-cert-file", s(&ca.cert)],
            "--amqp-cert-file needs --amqp-key-file",
        ),
        (
            vec![
                "--amqp-url",
                &amqps,
                "--amqp-cert-file",
                s(&ca.cert),
                "--amqp-key-file",
                s(&garbage),
            ],
            "no PEM private key",
        ),
        (vec!["--amqp-url", &url_missing_ca], "cacertfile"),
        (vec!["--amqp-url", &url_no_verify], "always verified"),
    ];
    for (flags, expect) in &cases {
        let mut commands: Vec<(&str, Vec<&str>)> = vec![
            ("guildhall", vec!["serve", "--listen", "127.0.0.1:0"]),
            (
                "guildhall",
                vec!["submit", "--stage", "a", "--payload", "x"],
            ),
            ("guildhall-bench", vec!["ingest", "--quick"]),
            (
                "guildhall-agent",
                vec!["--stage", "a", "--simulate", "median=1ms"],
            ),
        ];
        for (_, args) in &mut commands {
            args.extend(flags.iter().copied());
        }
        for (program, args) in commands {
            let (out, _) = run(program, &args, Duration::from_secs(30)).await;
            let line = error_line(program, &args, &out, 2);
            assert!(line.contains(expect), "{program} {args:?}: {line}");
        }
    }
    // The management API's own CA: only for https, and checked at start.
    for (flags, expect) in [
        (
            vec!["--management-ca-file", s(&garbage)],
            "needs an https:// --management-url",
        ),
        (
            vec![
                "--management-url",
                https_mgmt,
                "--management-ca-file",
                s(&garbage),
            ],
            "--management-ca-file",
        ),
    ] {
        for (program, first) in [
            ("guildhall", vec!["serve", "--listen", "127.0.0.1:0"]),
            ("guildhall-bench", vec!["ingest", "--quick"]),
        ] {
            let args: Vec<&str> = first.iter().chain(flags.iter()).copied().collect();
            let (out, _) = run(program, &args, Duration::from_secs(30)).await;
            let line = error_line(program, &args, &out, 2);
            assert!(line.contains(expect), "{program} {args:?}: {line}");
        }
    }
}

/// The stage the TLS pipeline runs.
const STAGE: &str = "work";
/// Tasks submitted over TLS.
const TASKS: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_client_certificates_end_to_end() {
    let ns = TestNs::new("tls");
    let dir = ns.log_dir.join("pki");
    let ca = TestCa::new(&dir, "guildhall-test-ca").unwrap();
    let server = ca.issue("server", CertUse::Server).unwrap();
    let client = ca.issue("tls-client", CertUse::Client).unwrap();
    let other = TestCa::new(&dir, "other-ca").unwrap();
    let started = Instant::now();
    let node = spawn_rabbitmq_node(
        &ns,
        "tls",
        &NodeTls {
            ca: ca.cert.clone(),
            server,
            require_client_cert: true,
        },
    )
    .await
    .unwrap();
    eprintln!("private node {} up in {:?}", node.name, started.elapsed());

    // The node speaks TLS only: no plain AMQP or HTTP listener.
    let m = node.management().unwrap();
    let overview: Value = m
        .request(reqwest::Method::GET, &["overview"])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let protocols: Vec<&str> = overview["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["protocol"].as_str())
        .collect();
    assert!(protocols.contains(&"amqp/ssl"), "{protocols:?}");
    assert!(
        !protocols.contains(&"amqp") && !protocols.contains(&"http"),
        "{protocols:?}"
    );

    let amqps = node.amqps_url();
    // Refused before authentication: any password will do, and it must not show.
    let bad_url = format!("amqps://guest:{SECRET}@127.0.0.1:{}/%2f", node.amqp_port);
    let identity = [
        "--amqp-cert-file",
        s(&client.cert),
        "--amqp-key-file",
        s(&client.key),
    ];

    // Hostile: a CA that did not sign the node's certificate, for each
    // binary; no client certificate where the node requires one. Each is
    // one line and status 1, promptly (no retry loop at start).
    let wrong_ca: Vec<&str> = ["--amqp-url", &bad_url, "--amqp-ca-file", s(&other.cert)]
        .into_iter()
        .chain(identity)
        .collect();
    let no_identity = vec!["--amqp-url", &bad_url, "--amqp-ca-file", s(&ca.cert)];
    let ns_flag = ["--namespace", ns.name()];
    for (program, first, flags, expect) in [
        (
            "guildhall",
            vec!["submit", "--stage", STAGE, "--payload", "x"],
            &wrong_ca,
            "certificate",
        ),
        (
            "guildhall",
            vec!["serve", "--listen", "127.0.0.1:0", "--management-url", ""],
            &wrong_ca,
            "certificate",
        ),
        (
            "guildhall-agent",
            vec!["--stage", STAGE, "--simulate", "median=1ms"],
            &wrong_ca,
            "certificate",
        ),
        (
            "guildhall-agent",
            vec!["--stage", STAGE, "--simulate", "median=1ms"],
            &no_identity,
            "",
        ),
    ] {
        let args: Vec<&str> = first
            .iter()
            .chain(flags.iter())
            .chain(ns_flag.iter())
            .copied()
            .collect();
        let (out, took) = run(program, &args, Duration::from_secs(30)).await;
        let line = error_line(program, &args, &out, 1);
        assert!(
            line.contains("cannot reach RabbitMQ at amqps://guest:***@127.0.0.1"),
            "{program} {args:?}: {line}"
        );
        assert!(
            line.to_lowercase().contains(expect),
            "{program} {args:?}: {line}"
        );
        eprintln!("refused in {took:?}: {line}");
    }

    // The real thing: coordinator, agent and submitter over amqps with the
    // CA and a client certificate; the management API over https with the
    // same CA (--management-ca-file defaults to --amqp-ca-file).
    let tls: Vec<&str> = ["--amqp-url", &amqps, "--amqp-ca-file", s(&ca.cert)]
        .into_iter()
        .chain(identity)
        .collect();
    let mut coordinator_flags = tls.clone();
    let management_url = node.management_url();
    coordinator_flags.extend(["--management-url", &management_url, "--queue-poll", "200ms"]);
    let c = spawn_coordinator(&ns, &coordinator_flags).await.unwrap();
    let mut agent_flags = tls.clone();
    agent_flags.extend([
        "--simulate",
        "median=20ms,spread=0.1",
        "--concurrency",
        "2",
        "--heartbeat",
        "500ms",
    ]);
    let agent = spawn_agent(&ns, "tls-agent", STAGE, &agent_flags)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the agent alive", || async {
        let workers = c.api.get_ok("/api/workers").await?;
        let alive = workers["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["id"] == agent.id.as_str() && w["status"] != "dead");
        anyhow::ensure!(alive, "{workers}");
        Ok(())
    })
    .await;
    let count = TASKS.to_string();
    let mut submit: Vec<&str> = vec!["submit", "--stage", STAGE, "--count", &count];
    submit.extend(tls.iter().copied());
    submit.extend(ns_flag);
    let (out, _) = run("guildhall", &submit, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "submit over amqps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(60),
        "every task done, unacked counts from the https management API",
        || async {
            let stages = c.api.get_ok("/api/stages").await?;
            let stage = stages["stages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|st| st["name"] == STAGE)
                .cloned()
                .unwrap_or(Value::Null);
            anyhow::ensure!(
                stage["succeeded"].as_u64() >= Some(TASKS),
                "not all done: {stage}"
            );
            anyhow::ensure!(
                stage["queue"]["unacked"].is_u64(),
                "no unacked count: {stage}"
            );
            let health = c.api.get_ok("/healthz").await?;
            anyhow::ensure!(
                health["management_api"] == true && health["broker_connected"] == true,
                "{health}"
            );
            Ok(())
        },
    )
    .await;

    // The broker saw TLS connections only, and the agent's client
    // certificate (connections show in the management API a few seconds
    // after they open).
    eventually(
        Duration::from_secs(20),
        "the agent's TLS connection listed",
        || async {
            let connections: Value = m
                .request(reqwest::Method::GET, &["connections"])
                .send()
                .await?
                .json()
                .await?;
            let connections = connections.as_array().cloned().unwrap_or_default();
            for conn in &connections {
                assert_eq!(conn["ssl"], true, "a connection without TLS: {conn}");
            }
            let agent_conn = connections
                .iter()
                .find(|conn| {
                    conn["user_provided_name"].as_str()
                        == Some(
                            ns.names
                                .agent_connection_name(&"tls-agent".parse().expect("id"))
                                .as_str(),
                        )
                })
                .ok_or_else(|| anyhow::anyhow!("not listed yet: {connections:?}"))?;
            assert!(
                agent_conn["peer_cert_subject"]
                    .as_str()
                    .is_some_and(|subject| subject.contains("CN=tls-client")),
                "{agent_conn}"
            );
            Ok(())
        },
    )
    .await;

    // Hostile: a management CA that did not sign the node's certificate. The
    // coordinator runs on (the management API is optional), says why in its
    // log, and has no unacked counts: the certificate is checked.
    // (The first coordinator goes first: the second one logs to its file.)
    drop(agent);
    drop(c);
    let mut flags = tls.clone();
    flags.extend([
        "--management-url",
        &management_url,
        "--management-ca-file",
        s(&other.cert),
    ]);
    let c2 = spawn_coordinator(&ns, &flags).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the second coordinator connected",
        || async {
            let health = c2.api.get_ok("/healthz").await?;
            anyhow::ensure!(health["broker_connected"] == true, "{health}");
            anyhow::ensure!(health["management_api"] == false, "{health}");
            Ok(())
        },
    )
    .await;
    let log = c2.proc.log_text();
    assert!(
        log.contains("management API unreachable") && log.to_lowercase().contains("certificate"),
        "{log}"
    );
    drop(c2);
    eprintln!("whole TLS test: {:?}", started.elapsed());
}
