//! The deploy files against a real Prometheus: it scrapes a live coordinator
//! (with a real agent and worker on the real broker) and loads
//! `deploy/prometheus/alerts.yml`; then every alert rule and every PromQL
//! expression of the Grafana dashboard must be valid, and every Guildhall
//! metric they name must be in the scrape. It also scrapes the local
//! broker's own exporter (`rabbitmq_prometheus`, as the compose cluster
//! does), so the dashboard's RabbitMQ panels name metrics that exist too.
//! This keeps the dashboards, the alerts and the code from drifting apart.

use guildhall_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `expr` in a Grafana dashboard (panels, nested rows, templating).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) if !e.trim().is_empty() => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

/// Grafana's variables replaced by what Prometheus accepts.
fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
        .replace("${stage:regex}", ".*")
        .replace("${worker:regex}", ".*")
        .replace("$stage", ".*")
        .replace("$worker", ".*")
}

/// The Guildhall and RabbitMQ metric names an expression mentions (a
/// histogram's series by their `_bucket`, `_sum` or `_count` name).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    for prefix in ["guildhall_", "rabbitmq_"] {
        let mut i = 0;
        while let Some(at) = expr[i..].find(prefix) {
            let start = i + at;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            // Part of a longer identifier (`x_guildhall_y`) is not a name.
            let inside =
                start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if !inside {
                names.insert(expr[start..end].to_owned());
            }
            i = end;
        }
    }
    names
}

/// Where the local broker's own exporter (the `rabbitmq_prometheus` plugin,
/// enabled by `.ci/run`) listens, as in `deploy/rabbitmq/rabbitmq.conf`.
const RABBITMQ_EXPORTER: &str = "127.0.0.1:15692";

async fn query(client: &reqwest::Client, base: &str, expr: &str) -> anyhow::Result<Value> {
    let mut url = reqwest::Url::parse(&format!("{base}/api/v1/query"))?;
    url.query_pairs_mut().append_pair("query", expr);
    let r: Value = client.get(url).send().await?.json().await?;
    anyhow::ensure!(r["status"] == "success", "{expr}: {r}");
    Ok(r["data"]["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_rule_and_dashboard_query_runs_on_a_real_prometheus() {
    let prometheus = PathBuf::from("/usr/bin/prometheus");
    assert!(
        prometheus.exists(),
        "install the Debian package prometheus (.ci/run does)"
    );
    let ns = TestNs::new("prom");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--queue-poll", "300ms", "--sync-period", "1s"])
        .await
        .unwrap();
    // A supervised worker process, so its CPU and memory are exported.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let listen_worker = format!("127.0.0.1:{port}");
    let worker_bin = bin("guildhall-test-worker").display().to_string();
    let _agent = spawn_agent(
        &ns,
        "p1",
        "work",
        &[
            "--heartbeat",
            "500ms",
            "--worker-url",
            url.as_str(),
            "--",
            worker_bin.as_str(),
            "http",
            "--listen",
            listen_worker.as_str(),
        ],
    )
    .await
    .unwrap();
    // Successes and a failure, so the task, histogram and error series exist.
    for i in 0..5 {
        let payload = if i == 0 {
            "fail=permanent class=bad_input"
        } else {
            "ok"
        };
        let body = serde_json::json!({"stage": "work", "id": format!("P-{i}"), "payload": payload});
        let (status, _) = c
            .api
            .post_raw("/api/tasks", &body.to_string())
            .await
            .unwrap();
        assert_eq!(status, 201);
    }
    eventually(Duration::from_secs(20), "the tasks finished", || async {
        let done = c.api.get_ok("/api/tasks?status=succeeded").await?;
        anyhow::ensure!(done["tasks"].as_array().map_or(0, Vec::len) == 4, "{done}");
        Ok(())
    })
    .await;

    // A real Prometheus scraping the coordinator every second, with the rules.
    let target = c.api.base.trim_start_matches("http://").to_owned();
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let config = ns.log_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: guildhall\n    static_configs:\n      - targets: [\"{target}\"]\n  - job_name: rabbitmq\n    static_configs:\n      - targets: [\"{RABBITMQ_EXPORTER}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_prom, _) = spawn_logged(
        &ns,
        "prometheus",
        &prometheus,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", ns.log_dir.join("tsdb").display()),
            format!("--web.listen-address={listen}"),
        ],
        &[],
        Some("Server is ready to receive web requests"),
    )
    .await
    .unwrap();
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "a few scrapes", || async {
        let r = query(&http, &base, "count_over_time(up{job=\"guildhall\"}[1m])").await?;
        let n: f64 = r[0]["value"][1].as_str().unwrap_or("0").parse()?;
        anyhow::ensure!(n >= 5.0, "{n} scrapes");
        Ok(())
    })
    .await;
    // The dashboard's RabbitMQ panels read the broker's own exporter.
    eventually(
        Duration::from_secs(30),
        "RabbitMQ's exporter scraped (rabbitmq-plugins enable rabbitmq_prometheus)",
        || async {
            let r = query(&http, &base, "up{job=\"rabbitmq\"}").await?;
            anyhow::ensure!(r[0]["value"][1] == "1", "{r}");
            Ok(())
        },
    )
    .await;

    // Every metric name used anywhere must be in the scrape.
    let mut exprs: Vec<(String, String)> = Vec::new();
    let loaded: Value = eventually(Duration::from_secs(20), "rules evaluated", || async {
        let r: Value = http
            .get(format!("{base}/api/v1/rules"))
            .send()
            .await?
            .json()
            .await?;
        let rules: Vec<Value> = r["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        anyhow::ensure!(
            !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok"),
            "{r}"
        );
        Ok(Value::Array(rules))
    })
    .await;
    for rule in loaded.as_array().unwrap() {
        exprs.push((
            format!("alert {}", rule["name"]),
            rule["query"].as_str().unwrap().to_owned(),
        ));
    }
    let dashboard = repo().join("deploy/grafana/dashboards/guildhall.json");
    if dashboard.exists() {
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
        let mut found = Vec::new();
        dashboard_exprs(&json, &mut found);
        assert!(!found.is_empty(), "the dashboard has queries");
        exprs.extend(
            found
                .into_iter()
                .map(|e| ("dashboard".to_owned(), instantiate(&e))),
        );
    }
    // Families whose every label value names an event that did not happen
    // here (which stage an agent moved from and to): no series to pre-create.
    const EVENT_ONLY: [&str; 1] = ["guildhall_worker_moves_total"];
    let mut missing = BTreeSet::new();
    let named: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    assert!(
        named.iter().any(|n| n.starts_with("rabbitmq_")),
        "the dashboard's RabbitMQ panels are checked too: {named:?}"
    );
    for (origin, expr) in &exprs {
        query(&http, &base, expr)
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e:#}"));
        for name in metric_names(expr)
            .into_iter()
            .filter(|n| !EVENT_ONLY.contains(&n.as_str()))
        {
            let series = query(&http, &base, &format!("count({name})"))
                .await
                .unwrap();
            if series.as_array().is_none_or(Vec::is_empty) {
                missing.insert(format!("{name} (used by {origin})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named in rules or dashboards but not exported (by the coordinator or RabbitMQ): {missing:?}"
    );
    eprintln!("prometheus: {} expressions checked", exprs.len());
}
