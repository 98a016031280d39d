//! What an orchestrator sees of a running agent and coordinator: the agent's
//! `/livez` and `/readyz` (`--probe-listen`), `guildhall healthcheck` (the
//! image's HEALTHCHECK) against both, and a missing or wrong `AMQP_URL`
//! ending either binary with one line and a status a restart policy acts on.

use guildhall_tests::*;
use serde_json::Value;
use std::process::Output;
use std::time::Duration;

/// GETs a probe: its status and JSON body.
async fn probe(url: &str) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::get(url).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Waits until `url` answers `status` with a body whose `state` is `state`.
async fn until_probe(url: &str, status: u16, state: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("{url} answers {status} in state {state}"),
        || async {
            let (got, body) = probe(url).await?;
            anyhow::ensure!(got == status && body["state"] == state, "{got} {body}");
            Ok(body)
        },
    )
    .await
}

async fn healthcheck(url: &str) -> Output {
    tokio::process::Command::new(bin("guildhall"))
        .args(["healthcheck", "--url", url])
        .output()
        .await
        .expect("run guildhall healthcheck")
}

#[tokio::test]
async fn agent_probes_follow_the_broker_and_the_worker() {
    let ns = TestNs::new("probes");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let mut agent = spawn_agent(
        &ns,
        "p-1",
        "probe",
        &["--simulate", "", "--probe-listen", &listen],
    )
    .await
    .expect("agent");
    let ready = until_probe(&format!("{base}/readyz"), 200, "idle").await;
    assert_eq!(ready["status"], "ok");
    assert_eq!(ready["connected"], true);
    let (code, live) = probe(&format!("{base}/livez")).await.expect("livez");
    assert_eq!(code, 200, "{live}");
    assert!(live["loop_age_ms"].as_u64().is_some_and(|ms| ms < 60_000));
    let (code, body) = probe(&format!("{base}/nope")).await.expect("404");
    assert_eq!(code, 404);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("/readyz"))
    );

    // The image's HEALTHCHECK against the agent.
    let o = healthcheck(&format!("{base}/readyz")).await;
    assert!(o.status.success(), "{o:?}");

    // The broker drops the agent's connection: unready (but alive) until it
    // has reconnected by itself.
    let management = guildhall_broker::Management::new(&management_url(), "/").expect("mgmt");
    // The first reconnect comes ~200 ms later, so each try closes the
    // connection and then polls quickly for the unready answer.
    let unready = eventually(
        Duration::from_secs(30),
        "/readyz fails after the broker closes the agent's connection",
        || async {
            let closed = management
                .close_connections_named(
                    &ns.names.agent_connection_name(&"p-1".parse()?),
                    "probe test",
                )
                .await?;
            anyhow::ensure!(closed > 0, "not listed yet");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            loop {
                let (code, body) = probe(&format!("{base}/readyz")).await?;
                if code == 503 {
                    return Ok(body);
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "still {code} {body}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    assert_eq!(unready["connected"], false);
    assert_eq!(unready["reason"], "not connected to the broker");
    let (code, _) = probe(&format!("{base}/livez")).await.expect("livez");
    assert_eq!(code, 200, "a lost broker must not make the agent unalive");
    // The agent may reconnect within milliseconds, so the failing
    // healthcheck is asserted against the agent that stays unready below.
    until_probe(&format!("{base}/readyz"), 200, "idle").await;

    // Stopping: draining is unready.
    agent.proc.signal("TERM");
    let status = agent
        .proc
        .wait(Duration::from_secs(30))
        .await
        .expect("exit");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn an_agent_waiting_for_its_worker_is_alive_but_not_ready() {
    let ns = TestNs::new("probes");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    // A supervised worker that never opens its port.
    let worker_url = format!("http://127.0.0.1:{}/", free_port());
    let mut agent = spawn_agent(
        &ns,
        "p-2",
        "probe",
        &[
            "--worker-url",
            &worker_url,
            "--probe-listen",
            &listen,
            "--",
            "sleep",
            "60",
        ],
    )
    .await
    .expect("agent");
    let body = until_probe(&format!("{base}/readyz"), 503, "starting").await;
    assert_eq!(body["reason"], "waiting for the worker to be ready");
    assert_eq!(body["connected"], true);
    let (code, _) = probe(&format!("{base}/livez")).await.expect("livez");
    assert_eq!(code, 200);
    // The image's HEALTHCHECK fails with one line while the agent is unready.
    let o = healthcheck(&format!("{base}/readyz")).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("HTTP 503"), "{err}");
    agent
        .proc
        .terminate(Duration::from_secs(30))
        .await
        .expect("stop");
}

#[tokio::test]
async fn a_taken_probe_port_is_a_one_line_start_error() {
    let ns = TestNs::new("probes");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let o = tokio::process::Command::new(bin("guildhall-agent"))
        .args(["--namespace", ns.name(), "--amqp-url", &amqp_url()])
        .args([
            "--stage",
            "probe",
            "--simulate",
            "",
            "--probe-listen",
            &addr,
        ])
        .output()
        .await
        .expect("run agent");
    let err = String::from_utf8_lossy(&o.stderr);
    // A runtime failure (status 1), like a broker that cannot be reached:
    // the flag itself is well formed.
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--probe-listen") && err.contains(&addr),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[tokio::test]
async fn coordinator_healthcheck_passes_and_fails_as_the_image_needs() {
    let ns = TestNs::new("probes");
    let coordinator = spawn_coordinator(&ns, &[]).await.expect("coordinator");
    // 503 "starting" until the stream consumer is connected, as a
    // container's first health checks see it; then healthy.
    let healthz = format!("{}/healthz", coordinator.api.base);
    let stdout = eventually(
        Duration::from_secs(30),
        "guildhall healthcheck passes",
        || async {
            let o = healthcheck(&healthz).await;
            anyhow::ensure!(o.status.success(), "{o:?}");
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        },
    )
    .await;
    assert!(stdout.starts_with("healthy: HTTP 200"), "{stdout}");
    let o = healthcheck(&format!("{}/livez", coordinator.api.base)).await;
    assert!(o.status.success(), "{o:?}");
    let o = healthcheck(&format!("http://127.0.0.1:{}/healthz", free_port())).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("guildhall: error: GET http://127.0.0.1:"),
        "{err}"
    );
}

/// Runs a binary the way a container does: configured by `AMQP_URL` in the
/// environment (or none at all), with backtraces asked for, so that any
/// panic would show.
async fn in_container(binary: &str, args: &[&str], amqp_url: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(bin(binary));
    cmd.args(args)
        .env_remove("AMQP_URL")
        .env("RUST_BACKTRACE", "full");
    if let Some(url) = amqp_url {
        cmd.env("AMQP_URL", url);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("exits by itself")
        .expect("runs")
}

#[tokio::test]
async fn a_missing_or_wrong_amqp_url_is_one_line_and_a_nonzero_status() {
    let ns = TestNs::new("probes");
    let serve = ["serve", "--namespace", ns.name(), "--listen", "127.0.0.1:0"];
    let agent = [
        "--namespace",
        ns.name(),
        "--stage",
        "probe",
        "--simulate",
        "",
    ];
    let wrong_password = "amqp://guest:wrong@127.0.0.1:5672/%2f";
    // Also what a container without AMQP_URL gets: the default is the
    // local broker, and nothing listens on a container's own 5672.
    let nobody_there = "amqp://guest:guest@127.0.0.1:1/%2f";
    // A service name that does not resolve (a typo in a compose file).
    let no_such_host = "amqp://guest:guest@no-such-host.invalid:5672/%2f";
    let cases: [(Option<&str>, i32, &str); 5] = [
        (Some("not a url"), 2, "invalid AMQP URL"),
        (Some("http://rabbitmq:5672/"), 2, "invalid AMQP scheme"),
        (Some(wrong_password), 1, "ACCESS_REFUSED"),
        (
            Some(nobody_there),
            1,
            "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/",
        ),
        (Some(no_such_host), 1, "no-such-host.invalid"),
    ];
    for (url, code, needle) in cases {
        for (binary, args) in [("guildhall", &serve[..]), ("guildhall-agent", &agent[..])] {
            let o = in_container(binary, args, url).await;
            let err = String::from_utf8_lossy(&o.stderr);
            let what = format!("{binary} with AMQP_URL={url:?}");
            assert_eq!(o.status.code(), Some(code), "{what}: {err}");
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            let last = lines.last().copied().unwrap_or_default();
            assert!(
                last.to_lowercase().contains(&needle.to_lowercase()),
                "{what}: {last:?} lacks {needle:?}"
            );
            assert!(
                !err.contains("panicked") && !err.contains("stack backtrace"),
                "{what}: {err}"
            );
            assert!(
                !err.contains(":wrong@"),
                "{what}: the password leaked: {err}"
            );
            // The error itself is one line; log lines before it are allowed
            // (the agent logs its start), but not a multi-line dump.
            assert!(last.contains("error"), "{what}: {last}");
        }
    }
}
