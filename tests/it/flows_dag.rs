//! Flows end to end (issue 19): the original plan's DAG, `task_worker`
//! fanning out per file, `pm_worker` per file, `result_worker` joining,
//! and a `deploy` task after some flows; 1,000 flows on the machine's
//! broker, then the same shape while an agent is SIGKILLed, the
//! coordinator is SIGKILLed and restarted without a snapshot, and the
//! broker (a private node) restarts.
//!
//! Real binaries, real test workers. The test reads every join's payload
//! off the join stage's worker (`/inputs`) and every task's status off the
//! coordinator: each flow completes with its three children counted once,
//! or fails for its planted reason; none is stuck.

use guildhall_tests::node::spawn_plain_rabbitmq_node;
use guildhall_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const FILES: usize = 3;

fn parent(i: usize) -> String {
    format!("P-{i:04}")
}

/// Every 50th flow's files fail for good at `pm`: its join fails.
fn planted(i: usize) -> bool {
    i % 50 == 7
}

/// Flow `i`'s payload; each of its files takes `sleep_ms` at `pm`.
fn payload(i: usize, sleep_ms: u64) -> String {
    let fail = if planted(i) {
        " child:pm:fail=permanent"
    } else {
        ""
    };
    format!("flow-{i} fanout={FILES} child:sleep={sleep_ms}{fail}")
}

/// The DAG's processes: a test worker and agents per stage, on `url`.
struct Dag {
    agents: Vec<(String, &'static str, Vec<String>, Agent)>,
    workers: BTreeMap<&'static str, HttpWorker>,
    coordinator: Option<Coordinator>,
    coordinator_flags: Vec<String>,
    url: String,
    ns: TestNs,
    /// What each file costs at `pm`, ms.
    sleep_ms: u64,
}

impl Dag {
    async fn start(ns: TestNs, url: String, extra: &[&str]) -> Self {
        let mut coordinator_flags: Vec<String> = vec!["--amqp-url".into(), url.clone()];
        coordinator_flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = coordinator_flags.iter().map(String::as_str).collect();
        let coordinator = spawn_coordinator(&ns, &flags).await.unwrap();
        let mut workers = BTreeMap::new();
        for stage in ["task", "pm", "result", "deploy"] {
            workers.insert(
                stage,
                spawn_http_worker(&ns, &format!("worker-{stage}"))
                    .await
                    .unwrap(),
            );
        }
        let mut dag = Self {
            agents: Vec::new(),
            workers,
            coordinator: Some(coordinator),
            coordinator_flags,
            url,
            ns,
            sleep_ms: 20,
        };
        for (id, stage, extra) in [
            ("task-1", "task", &["--next", "pm", "--join", "result"][..]),
            ("pm-1", "pm", &[][..]),
            ("pm-2", "pm", &[][..]),
            ("result-1", "result", &[][..]),
            ("deploy-1", "deploy", &[][..]),
        ] {
            let mut flags: Vec<String> = [
                "--amqp-url",
                dag.url.as_str(),
                "--worker-url",
                dag.workers[stage].url.as_str(),
                "--concurrency",
                "8",
                "--heartbeat",
                "1s",
                "--retry-delay",
                "100ms",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            flags.extend(extra.iter().map(|s| s.to_string()));
            let agent = dag.spawn(id, stage, &flags).await;
            dag.agents.push((id.to_owned(), stage, flags, agent));
        }
        dag
    }

    async fn spawn(&self, id: &str, stage: &str, flags: &[String]) -> Agent {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        spawn_agent(&self.ns, id, stage, &flags).await.unwrap()
    }

    fn api(&self) -> Api {
        self.coordinator
            .as_ref()
            .expect("a coordinator")
            .api
            .clone()
    }

    /// Submits flows `range` and, for every tenth, a `deploy` task held
    /// after it, through the API.
    async fn submit(&self, range: std::ops::Range<usize>) {
        let api = self.api();
        for i in range.clone() {
            let body =
                json!({"stage": "task", "id": parent(i), "payload": payload(i, self.sleep_ms)});
            let (code, answer) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
            assert!((200..300).contains(&code), "{answer}");
        }
        for i in range.filter(|i| i % 10 == 0) {
            let body = json!({
                "stage": "deploy",
                "id": format!("D-{i:04}"),
                "payload": format!("deploy-{i}"),
                "after": [parent(i)],
            });
            let (code, answer) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
            assert_eq!(code, 202, "{answer}");
        }
    }

    /// SIGKILLs the agent `id` and starts it again.
    async fn kill_agent(&mut self, id: &str) {
        let idx = self.agents.iter().position(|a| a.0 == id).expect("agent");
        let (agent_id, stage, flags, agent) = &mut self.agents[idx];
        agent.proc.signal("KILL");
        let _ = agent.proc.child.wait().await;
        let (agent_id, stage, flags) = (agent_id.clone(), *stage, flags.clone());
        let fresh = self.spawn(&agent_id, stage, &flags).await;
        self.agents[idx].3 = fresh;
    }

    /// SIGKILLs the coordinator and starts a new one (no data dir: it
    /// replays the whole stream).
    async fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.proc.signal("KILL");
            let _ = c.proc.child.wait().await;
        }
        let flags: Vec<&str> = self.coordinator_flags.iter().map(String::as_str).collect();
        let started = Instant::now();
        loop {
            match spawn_coordinator(&self.ns, &flags).await {
                Ok(c) => {
                    self.coordinator = Some(c);
                    return;
                }
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("coordinator not up yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("no coordinator after 60 s: {e:#}"),
            }
        }
    }
}

/// What has finished so far: each join's payload (the last the join
/// stage's worker was given) and the flows and deploys the coordinator
/// shows succeeded or dead-lettered.
#[derive(Default)]
struct Sink {
    joins: BTreeMap<String, Value>,
    /// Joins the worker was given more than once (at least once).
    duplicates: usize,
    succeeded: BTreeSet<String>,
    dead: BTreeSet<String>,
}

impl Sink {
    async fn drain(&mut self, dag: &Dag) {
        if let Ok(inputs) = dag.workers["result"].inputs().await {
            self.duplicates = inputs.keys().filter(|k| !k.ends_with("/result/1")).count();
            for (key, body) in inputs {
                let Some(id) = key.split('/').next() else {
                    continue;
                };
                let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
                    panic!("{key}: the join's payload is not JSON ({e}): {body}")
                });
                self.joins.insert(id.to_owned(), v);
            }
        }
        let Some(c) = dag.coordinator.as_ref() else {
            return;
        };
        for (status, set) in [
            ("succeeded", &mut self.succeeded),
            ("dead_lettered", &mut self.dead),
        ] {
            for stage in ["result", "deploy"] {
                let path = format!("/api/tasks?status={status}&stage={stage}&limit=1000");
                if let Ok(v) = c.api.get_ok(&path).await {
                    for t in v["tasks"].as_array().into_iter().flatten() {
                        if let Some(id) = t["id"].as_str() {
                            set.insert(id.to_owned());
                        }
                    }
                }
            }
        }
    }

    fn deploys(&self) -> usize {
        self.succeeded
            .iter()
            .filter(|id| id.starts_with("D-"))
            .count()
    }

    fn flows_done(&self) -> usize {
        self.succeeded
            .iter()
            .filter(|id| id.starts_with("P-"))
            .count()
    }
}

/// Waits for every flow to finish (or fail as planted).
struct Progress {
    sink: Sink,
    started: Instant,
    timeout: Duration,
    want_joins: usize,
    want_deploys: usize,
}

impl Progress {
    fn new(flows: usize, timeout: Duration) -> Self {
        Self {
            sink: Sink::default(),
            started: Instant::now(),
            timeout,
            want_joins: (0..flows).filter(|i| !planted(*i)).count(),
            want_deploys: (0..flows).filter(|i| i % 10 == 0 && !planted(*i)).count(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether everything finished; panics past the timeout.
    async fn done(&mut self, dag: &Dag) -> bool {
        self.sink.drain(dag).await;
        if self.sink.flows_done() >= self.want_joins && self.sink.deploys() >= self.want_deploys {
            return true;
        }
        assert!(
            self.elapsed() < self.timeout,
            "timed out: {} of {} flows, {} of {} deploys (logs in {})",
            self.sink.flows_done(),
            self.want_joins,
            self.sink.deploys(),
            self.want_deploys,
            dag.ns.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        false
    }
}

/// Every flow joined its three children once, or failed for its planted
/// reason; the deploys ran after their flows.
async fn assert_complete(dag: &Dag, flows: usize, sink: &Sink, what: &str) {
    for i in (0..flows).filter(|i| !planted(*i)) {
        let p = parent(i);
        assert!(sink.succeeded.contains(&p), "{what}: {p} did not finish");
        let join = sink
            .joins
            .get(&p)
            .unwrap_or_else(|| panic!("{what}: {p} never joined"));
        assert_eq!(join["parent"], p.as_str(), "{what}: {join}");
        let children = join["children"].as_array().expect("children");
        assert_eq!(children.len(), FILES, "{what}: {p}: {join}");
        for (n, c) in children.iter().enumerate() {
            assert_eq!(c["id"], format!("{p}:{n}").as_str(), "{what}: {join}");
            assert_eq!(c["status"], "succeeded", "{what}: {join}");
            // The pm worker's output: the child's payload, then " @pm".
            let text = c["result_text"].as_str().unwrap_or_default();
            assert!(
                text.ends_with(&format!("n={n} @pm")),
                "{what}: {p}'s child {n} carries another's result: {c}"
            );
        }
    }
    let api = dag.api();
    for i in (0..flows).filter(|i| planted(*i)) {
        let p = parent(i);
        assert!(
            !sink.joins.contains_key(&p),
            "{what}: {p}'s children all failed, yet it joined"
        );
        let t = eventually(Duration::from_secs(30), "the planted failure", || async {
            let t = api.get_ok(&format!("/api/tasks/{p}")).await?;
            anyhow::ensure!(t["status"] == "dead_lettered", "{t}");
            Ok(t)
        })
        .await;
        let why = t["flow"]["failed_because"].as_str().unwrap_or_default();
        assert!(why.contains(&format!("{p}:")), "{what}: {p}: {t}");
        if i % 10 == 0 {
            let d = format!("D-{i:04}");
            let t = api.get_ok(&format!("/api/tasks/{d}")).await.unwrap();
            assert_eq!(t["status"], "dead_lettered", "{what}: {d}: {t}");
        }
    }
    for i in (0..flows).filter(|i| i % 10 == 0 && !planted(*i)) {
        let d = format!("D-{i:04}");
        assert!(sink.succeeded.contains(&d), "{what}: {d} never ran");
        // ... and after its flow: its start follows the parent's end.
        let t = api.get_ok(&format!("/api/tasks/{d}")).await.unwrap();
        let p = api
            .get_ok(&format!("/api/tasks/{}", parent(i)))
            .await
            .unwrap();
        let started = t["attempts"][0]["started_at_ms"].as_u64().unwrap_or(0);
        let finished = p["finished_at_ms"].as_u64().unwrap_or(u64::MAX);
        assert!(
            started >= finished,
            "{what}: {d} started before {} finished",
            parent(i)
        );
    }
    // Nothing waits: no held task and no open join is left.
    let m = api.metrics().await.unwrap();
    for reason in ["dependency", "join"] {
        assert_eq!(
            m.value("guildhall_held_tasks", &[("reason", reason)]),
            Some(0.0),
            "{what}: {reason}"
        );
    }
    eprintln!(
        "flows {what}: {flows} flows of {FILES} files, {} joined, {} failed as planted, {} deploys, {} joins given to the worker twice",
        sink.joins.len(),
        (0..flows).filter(|i| planted(*i)).count(),
        sink.deploys(),
        sink.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_flows_of_the_original_plan_complete() {
    let ns = TestNs::exclusive("flows-dag");
    let broker = Broker::connect(&ns).await.unwrap();
    for stage in ["task", "pm", "result", "deploy"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let dag = Dag::start(ns, amqp_url(), &[]).await;
    let flows = 1_000;
    dag.submit(0..flows).await;
    let mut progress = Progress::new(flows, Duration::from_secs(300));
    while !progress.done(&dag).await {}
    let sink = progress.sink;
    assert_complete(&dag, flows, &sink, "clean run").await;
    // A clean run releases each join once: the result worker saw each
    // parent once.
    let calls = dag.workers["result"].calls().await.unwrap();
    for i in (0..flows).filter(|i| !planted(*i)) {
        let key = format!("{}/result/1", parent(i));
        assert_eq!(calls.get(&key), Some(&1), "{key}: {calls:?}");
    }
    let m = dag.api().metrics().await.unwrap();
    let joined = (0..flows).filter(|i| !planted(*i)).count() as f64;
    assert_eq!(
        m.value(
            "guildhall_flow_releases_total",
            &[("reason", "join"), ("outcome", "published")]
        ),
        Some(joined)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_complete_while_an_agent_the_coordinator_and_the_broker_die() {
    let ns = TestNs::new("flows-chaos");
    let mut node = spawn_plain_rabbitmq_node(&ns, "flows").await.unwrap();
    let url = node.amqp_url();
    let management = node.management_url();
    {
        let broker = Broker::connect_to(&ns, &url).await.unwrap();
        for stage in ["task", "pm", "result", "deploy"] {
            broker.declare_stage(stage).await.unwrap();
        }
    }
    let mut dag = Dag::start(ns, url, &["--management-url", &management]).await;
    // 300 flows of 3 files at 150 ms on 16 slots: ~9 s of work, so the
    // chaos strikes mid-run.
    dag.sleep_ms = 150;
    let flows = 300;
    dag.submit(0..flows / 2).await;
    let mut progress = Progress::new(flows, Duration::from_secs(400));
    let mut step = 0;
    while !progress.done(&dag).await {
        let elapsed = progress.elapsed();
        match step {
            0 if elapsed > Duration::from_secs(2) => {
                dag.kill_agent("pm-1").await;
                step += 1;
            }
            1 if elapsed > Duration::from_secs(4) => {
                dag.kill_coordinator().await;
                dag.submit(flows / 2..flows).await;
                step += 1;
            }
            2 => {
                node.restart().await.unwrap();
                step += 1;
            }
            _ => {}
        }
    }
    assert_eq!(step, 3, "the run ended before all the chaos");
    assert_complete(&dag, flows, &progress.sink, "chaos").await;
}
