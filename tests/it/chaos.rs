//! Chaos: a three-stage pipeline keeps every task while agents, worker
//! processes, the broker and the coordinator are killed under it.
//!
//! Each test runs `a -> b -> c -> sink` (nobody consumes `sink`: what lands
//! there finished the pipeline) with two agents per stage and 1,000 tasks, 2%
//! of them planted to fail permanently at `b`. It then checks, on the broker
//! itself, that every task reached `sink` or `<ns>.dead.b` for that planted
//! reason, and reports how many ran twice. Chaos tests hold the broker alone,
//! so their timings are not disturbed by other tests.

use guildhall_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

const TASKS: usize = 1_000;
const STAGES: [&str; 3] = ["a", "b", "c"];

fn id(i: usize) -> String {
    format!("C-{i:04}")
}

fn planted_dead(i: usize) -> bool {
    i % 50 == 7
}

/// In the SIGSTOP test the first tasks are slow at `b`, so a `b` agent is
/// sure to hold one for a while (it is frozen then).
const SLOW_AT_B: usize = 8;

/// What every task costs its worker at each stage, ms.
const WORK_MS: u64 = 100;

fn payload(i: usize, slow_at_b: bool) -> String {
    let fail = if planted_dead(i) {
        " b:fail=permanent"
    } else {
        ""
    };
    let slow = if slow_at_b && i < SLOW_AT_B {
        " b:sleep=3000"
    } else {
        ""
    };
    // 100 ms a stage: with 8 slots a stage, 1,000 tasks take ~12 s, long
    // enough for each test's chaos to strike mid-run (at 40 ms, once agents
    // stopped holding each slot for the 50 ms event flush, a run ended in
    // ~4 s, before the broker restart at 3 s or the coordinator kill).
    format!("chaos-{i} sleep={WORK_MS}{fail}{slow}")
}

/// A running pipeline under test.
struct Fleet {
    /// Agent id, stage, flags and process of each agent.
    agents: Vec<(String, &'static str, Vec<String>, Agent)>,
    /// The coordinator (taken out while it is down).
    coordinator: Option<Coordinator>,
    /// One HTTP worker per stage, shared by the stage's agents (unless supervised).
    workers: HashMap<&'static str, HttpWorker>,
    /// Declared last so it is dropped last: its clean-up needs the agents
    /// (and their exclusive queues) gone.
    ns: TestNs,
}

impl Fleet {
    /// Starts the coordinator and six agents. `supervised_b` runs stage b's
    /// workers as processes supervised by their agents.
    async fn start(ns: TestNs, coordinator_flags: &[&str], supervised_b: bool) -> Self {
        let broker = Broker::connect(&ns).await.unwrap();
        for stage in ["a", "b", "c", "sink"] {
            broker.declare_stage(stage).await.unwrap();
        }
        let coordinator = spawn_coordinator(&ns, coordinator_flags).await.unwrap();
        let mut workers = HashMap::new();
        for stage in STAGES {
            workers.insert(
                stage,
                spawn_http_worker(&ns, &format!("worker-{stage}"))
                    .await
                    .unwrap(),
            );
        }
        let mut fleet = Self {
            ns,
            coordinator: Some(coordinator),
            workers,
            agents: Vec::new(),
        };
        for (i, stage) in STAGES.iter().enumerate() {
            for n in 1..=2 {
                let next = ["b", "c", "sink"][i];
                let mut flags: Vec<String> = [
                    "--next",
                    next,
                    "--concurrency",
                    "4",
                    "--heartbeat",
                    "1s",
                    "--retry-delay",
                    "100ms",
                    "--shutdown-timeout",
                    "5s",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if supervised_b && *stage == "b" {
                    let port = free_port();
                    let url = format!("http://127.0.0.1:{port}/");
                    flags.extend(["--worker-url".into(), url, "--".into()]);
                    flags.push(bin("guildhall-test-worker").display().to_string());
                    flags.extend([
                        "http".into(),
                        "--listen".into(),
                        format!("127.0.0.1:{port}"),
                    ]);
                } else {
                    flags.extend(["--worker-url".into(), fleet.workers[stage].url.clone()]);
                }
                let agent_id = format!("{stage}-{n}");
                let agent = fleet.spawn(&agent_id, stage, &flags).await;
                fleet.agents.push((agent_id, stage, flags, agent));
            }
        }
        let api = fleet.api();
        eventually(Duration::from_secs(30), "six live workers", || async {
            let w = api.get_ok("/api/workers").await?;
            let alive = w["workers"].as_array().map(|l| {
                l.iter()
                    .filter(|w| matches!(w["status"].as_str(), Some("idle" | "processing")))
                    .count()
            });
            anyhow::ensure!(alive == Some(6), "{w}");
            Ok(())
        })
        .await;
        fleet
    }

    async fn spawn(&self, agent_id: &str, stage: &str, flags: &[String]) -> Agent {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        spawn_agent(&self.ns, agent_id, stage, &flags)
            .await
            .unwrap()
    }

    fn api(&self) -> Api {
        self.coordinator
            .as_ref()
            .expect("a coordinator")
            .api
            .clone()
    }

    async fn submit_all(&self) {
        self.submit(0..TASKS, false).await;
    }

    /// Submits tasks `range`; `slow_at_b` makes the first few slow at `b`.
    /// Waits up to 30 s for the broker (it may have just been restarted).
    async fn submit(&self, range: std::ops::Range<usize>, slow_at_b: bool) {
        let started = Instant::now();
        let broker = loop {
            match Broker::connect(&self.ns).await {
                Ok(broker) => break broker,
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    eprintln!("submit: broker not ready yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("submit: no broker after 30 s: {e:#}"),
            }
        };
        for i in range {
            broker
                .publish_task("a", &id(i), &payload(i, slow_at_b))
                .await
                .unwrap();
        }
    }

    /// SIGKILLs agent `idx` and starts it again with the same id and flags.
    async fn kill_and_restart(&mut self, idx: usize, pause: Duration) {
        let (agent_id, stage, flags, agent) = &mut self.agents[idx];
        agent.proc.signal("KILL");
        let _ = agent.proc.child.wait().await;
        tokio::time::sleep(pause).await;
        let (agent_id, stage, flags) = (agent_id.clone(), *stage, flags.clone());
        let fresh = self.spawn(&agent_id, stage, &flags).await;
        self.agents[idx].3 = fresh;
    }
}

/// What has come out of the pipeline so far, read from the broker.
#[derive(Default)]
struct Tally {
    finished: BTreeSet<String>,
    dead: BTreeSet<String>,
    /// Messages that arrived in `sink` (or the dead-letter queue) again.
    duplicates: usize,
}

impl Tally {
    /// Drains `sink` and `<ns>.dead.b`; a broker that is down is skipped.
    async fn drain(&mut self, ns: &TestNs) {
        let Ok(broker) = Broker::connect(ns).await else {
            return;
        };
        for (queue, set) in [
            (
                ns.names.stage_queue(&TestNs::stage("sink")),
                &mut self.finished,
            ),
            (ns.names.dead_queue(&TestNs::stage("b")), &mut self.dead),
        ] {
            if let Ok(msgs) = broker.drain(&queue).await {
                for (id, _, _) in msgs {
                    if !set.insert(id) {
                        self.duplicates += 1;
                    }
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.finished.len() + self.dead.len() >= TASKS
    }

    /// Every task finished, or sits in the dead-letter queue for its planted reason.
    fn assert_complete(&self, what: &str) {
        let want_dead: BTreeSet<String> = (0..TASKS).filter(|i| planted_dead(*i)).map(id).collect();
        let want_done: BTreeSet<String> =
            (0..TASKS).filter(|i| !planted_dead(*i)).map(id).collect();
        let missing: Vec<&String> = want_done.difference(&self.finished).collect();
        assert!(
            missing.is_empty(),
            "{what}: {} tasks never finished, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(
            self.dead, want_dead,
            "{what}: dead letters are exactly the planted ones"
        );
        assert!(
            self.finished.is_disjoint(&self.dead),
            "{what}: a task both finished and dead-lettered"
        );
        eprintln!(
            "chaos {what}: {TASKS} tasks, {} finished, {} dead-lettered as planted, 0 lost, {} delivered twice to the end",
            self.finished.len(),
            self.dead.len(),
            self.duplicates
        );
    }
}

/// Drains until every task is accounted for, running `chaos` between checks.
async fn run_until_done<F, Fut>(ns: &TestNs, timeout: Duration, mut chaos: F) -> Tally
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut tally = Tally::default();
    loop {
        tally.drain(ns).await;
        if tally.done() {
            break;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out: {} finished, {} dead of {TASKS} (logs in {})",
            tally.finished.len(),
            tally.dead.len(),
            ns.log_dir.display()
        );
        chaos(started.elapsed()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late duplicates (a killed attempt that had already handed on) show up now or never.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tally.drain(ns).await;
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_random_agents() {
    let mut fleet = Fleet::start(TestNs::exclusive("chaos-kill"), &[], false).await;
    fleet.submit_all().await;
    let mut kills = 0;
    let mut next_kill = Duration::from_secs(1);
    let ns_dir = fleet.ns.log_dir.clone();
    let mut tally = Tally::default();
    let started = Instant::now();
    while !tally.done() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out (logs in {})",
            ns_dir.display()
        );
        if started.elapsed() >= next_kill {
            let victim = rand::random::<u32>() as usize % fleet.agents.len();
            fleet
                .kill_and_restart(victim, Duration::from_millis(300))
                .await;
            kills += 1;
            next_kill = started.elapsed() + Duration::from_millis(1000);
        }
        tally.drain(&fleet.ns).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tally.drain(&fleet.ns).await;
    assert!(
        kills >= 3,
        "only {kills} kills: the run was too short to test anything"
    );
    eprintln!("chaos sigkill: {kills} agents killed and restarted");
    tally.assert_complete("sigkill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_an_agent_holding_tasks() {
    let hook = WebhookSink::start().await;
    let fleet = Fleet::start(
        TestNs::exclusive("chaos-stop"),
        &["--alert-webhook", &hook.url],
        false,
    )
    .await;
    let api = fleet.api();
    let victim = fleet.agents.iter().find(|a| a.0 == "b-1").expect("b-1");
    // The management API lists a connection only after its statistics
    // refresh (~5 s): wait until it lists b-1's, the usual case of a frozen
    // worker that had been connected for a while.
    let management = guildhall_broker::Management::new(&management_url(), "/").unwrap();
    eventually(
        Duration::from_secs(20),
        "b-1's connection listed",
        || async {
            let listed = management.connections().await?.into_iter().any(|c| {
                c.user_provided_name.as_deref()
                    == Some(
                        fleet
                            .ns
                            .names
                            .agent_connection_name(&"b-1".parse().expect("id"))
                            .as_str(),
                    )
            });
            anyhow::ensure!(listed, "not yet");
            Ok(())
        },
    )
    .await;
    fleet.submit(0..TASKS, true).await;
    // Freeze it while it holds one of the slow tasks (the coordinator has
    // seen it start, and it runs for 3 s). The tasks it held are the ones the
    // coordinator requeues when it declares it dead (its alert lists them).
    let slow: Vec<String> = (0..SLOW_AT_B).map(id).collect();
    eventually(
        Duration::from_secs(30),
        "b-1 holding a slow task",
        || async {
            let w = api.get_ok("/api/workers/b-1").await?;
            let holds_slow = w["current_tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| {
                    t["task_id"]
                        .as_str()
                        .is_some_and(|id| slow.iter().any(|s| s == id))
                });
            anyhow::ensure!(holds_slow, "{w}");
            Ok(())
        },
    )
    .await;
    victim.3.proc.signal("STOP");
    let stopped_at = guildhall_broker::now_ms();
    let alert = eventually(Duration::from_secs(15), "b-1 declared dead", || async {
        let dead = hook.of_kind("worker_dead");
        anyhow::ensure!(!dead.is_empty(), "no alert yet");
        Ok(dead[0].clone())
    })
    .await;
    assert_eq!(alert["worker"], "b-1", "{alert}");
    let held: Vec<String> = alert["tasks_requeued"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    assert!(
        held.iter().any(|h| slow.contains(h)),
        "the slow task it held is requeued: {alert}"
    );
    // The tasks it held go to the other b agent once the coordinator has
    // declared it dead and closed its connection.
    let mut redelivery_ms = Vec::new();
    for task in &held {
        let ms = eventually(
            Duration::from_secs(30),
            "redelivery to another agent",
            || async {
                let t = api.get_ok(&format!("/api/tasks/{task}")).await?;
                let started = t["attempts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|a| {
                        (a["stage"] == "b" && a["worker"] != "b-1")
                            .then(|| a["started_at_ms"].as_u64())
                            .flatten()
                    });
                match started {
                    Some(s) => Ok(s.saturating_sub(stopped_at)),
                    None => anyhow::bail!("not redelivered yet: {t}"),
                }
            },
        )
        .await;
        redelivery_ms.push(ms);
    }
    let worst = redelivery_ms.iter().copied().max().unwrap_or(0);
    eprintln!(
        "chaos sigstop: {} task(s) held by the frozen agent, back in others' hands after {redelivery_ms:?} ms",
        held.len()
    );
    assert!(
        worst <= 5_000,
        "frozen agent's tasks took {worst} ms to come back (design limit 5 s)"
    );
    let w = api.get_ok("/api/workers/b-1").await.unwrap();
    assert_eq!(w["status"], "dead", "{w}");

    // Wake it: it finds its connection closed, reconnects, and its late
    // results are recorded as stale, not as second completions.
    tokio::time::sleep(Duration::from_secs(1)).await;
    victim.3.proc.signal("CONT");
    eventually(
        Duration::from_secs(30),
        "late results marked stale",
        || async {
            for task in &held {
                let t = api.get_ok(&format!("/api/tasks/{task}")).await?;
                let row = t["attempts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["stage"] == "b" && a["worker"] == "b-1")
                    .cloned()
                    .unwrap_or_default();
                anyhow::ensure!(
                    row["outcome"] == "requeued" && row["stale_result"].is_string(),
                    "{task}: {row}"
                );
            }
            Ok(())
        },
    )
    .await;
    eventually(Duration::from_secs(15), "b-1 back", || async {
        let w = api.get_ok("/api/workers/b-1").await?;
        anyhow::ensure!(
            matches!(w["status"].as_str(), Some("idle" | "processing")),
            "{w}"
        );
        Ok(())
    })
    .await;
    let tally = run_until_done(&fleet.ns, Duration::from_secs(120), |_| async {}).await;
    tally.assert_complete("sigstop");
    let m = api.metrics().await.unwrap();
    assert!(
        m.value(
            "guildhall_connections_closed_total",
            &[("outcome", "closed")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_supervised_worker_processes() {
    let fleet = Fleet::start(TestNs::exclusive("chaos-worker"), &[], true).await;
    let api = fleet.api();
    fleet.submit_all().await;
    let mut kills = 0;
    let mut next_kill = Duration::from_secs(1);
    let tally = run_until_done(&fleet.ns, Duration::from_secs(120), |elapsed| {
        let api = api.clone();
        // Six kills, 2 s apart: more would (rightly) drive the agents'
        // restart backoff to its cap and stall the stage for 30 s.
        let due = kills < 6 && elapsed >= next_kill;
        if due {
            next_kill = elapsed + Duration::from_secs(2);
            kills += 1;
        }
        let victim = if kills % 2 == 0 { "b-1" } else { "b-2" };
        async move {
            if !due {
                return;
            }
            if let Ok(w) = api.get_ok(&format!("/api/workers/{victim}")).await
                && let Some(pid) = w["worker_pid"].as_u64()
            {
                signal_pid(pid as u32, "KILL");
            }
        }
    })
    .await;
    tally.assert_complete("worker sigkill");
    assert!(kills >= 3, "only {kills} kills");
    eventually(Duration::from_secs(10), "restarts reported", || async {
        let mut total = 0;
        for w in ["b-1", "b-2"] {
            total += api.get_ok(&format!("/api/workers/{w}")).await?["restarts"]
                .as_u64()
                .unwrap_or(0);
        }
        anyhow::ensure!(total >= 2, "{total} restarts");
        Ok(())
    })
    .await;
}

/// Puts RabbitMQ back if the test fails while it is stopped.
struct BrokerGuard {
    stopped: bool,
}

impl BrokerGuard {
    fn ctl(args: &[&str]) {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&mut self) {
        Self::ctl(&["stop_app"]);
        self.stopped = true;
    }

    fn start(&mut self) {
        Self::ctl(&["start_app"]);
        Self::ctl(&["await_startup"]);
        self.stopped = false;
    }
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rabbitmq_mid_run() {
    let fleet = Fleet::start(TestNs::exclusive("chaos-broker"), &[], false).await;
    let api = fleet.api();
    // Half the tasks before the restart and half after, so the run spans it
    // however fast this machine drains a queue (publishing 1,000 tasks one
    // confirm at a time can take longer than the pipeline needs for them).
    fleet.submit(0..TASKS / 2, false).await;
    let mut guard = BrokerGuard { stopped: false };
    let mut restarted = false;
    let rest = &fleet;
    let tally = run_until_done(&fleet.ns, Duration::from_secs(180), |elapsed| {
        let due = !restarted && elapsed >= Duration::from_secs(1);
        if due {
            restarted = true;
            guard.stop();
            std::thread::sleep(Duration::from_secs(3));
            guard.start();
        }
        async move {
            if due {
                rest.submit(TASKS / 2..TASKS, false).await;
            }
        }
    })
    .await;
    assert!(restarted, "the run ended before the broker restart");
    tally.assert_complete("broker restart");
    // The coordinator reconnected and follows the stream again.
    eventually(
        Duration::from_secs(30),
        "coordinator healthy again",
        || async {
            let h = api.get_ok("/healthz").await?;
            anyhow::ensure!(h["broker_connected"] == true, "{h}");
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_the_coordinator() {
    let data_dir = std::env::temp_dir().join(format!(
        "guildhall-chaos-data-{:08x}",
        rand::random::<u32>()
    ));
    let dir = data_dir.display().to_string();
    let flags = ["--data-dir", dir.as_str(), "--snapshot-interval", "1s"];
    let mut fleet = Fleet::start(TestNs::exclusive("chaos-coord"), &flags, false).await;
    // Half the tasks before the kill and half after, so the run spans it
    // however fast the pipeline is next to the submitter.
    fleet.submit(0..TASKS / 2, false).await;
    let mut killed = false;
    let mut tally = Tally::default();
    let started = Instant::now();
    while !tally.done() {
        assert!(started.elapsed() < Duration::from_secs(120), "timed out");
        if !killed && tally.finished.len() >= TASKS / 6 {
            let mut c = fleet.coordinator.take().expect("running");
            c.proc.signal("KILL");
            let _ = c.proc.child.wait().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            fleet.coordinator = Some(spawn_coordinator(&fleet.ns, &flags).await.unwrap());
            killed = true;
            fleet.submit(TASKS / 2..TASKS, false).await;
        }
        tally.drain(&fleet.ns).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(killed, "the run ended before the coordinator was killed");
    tally.assert_complete("coordinator kill");
    // The rebuilt state equals a run without the kill: every task's trace,
    // and the counters.
    let api = fleet.api();
    let ok = (0..TASKS).filter(|i| !planted_dead(*i)).count() as f64;
    let dead = TASKS as f64 - ok;
    eventually(
        Duration::from_secs(30),
        "traces and counters as without the kill",
        || async {
            for i in 0..TASKS {
                let t = api.get_ok(&format!("/api/tasks/{}", id(i))).await?;
                let ok_rows: Vec<&str> = t["attempts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|a| a["outcome"] == "succeeded")
                    .filter_map(|a| a["stage"].as_str())
                    .collect();
                let want: &[&str] = if planted_dead(i) {
                    &["a"]
                } else {
                    &["a", "b", "c"]
                };
                anyhow::ensure!(ok_rows == want, "{}: {t}", id(i));
            }
            let m = api.metrics().await?;
            let v = |stage: &str, outcome: &str| {
                m.value(
                    "guildhall_tasks_total",
                    &[("stage", stage), ("outcome", outcome)],
                )
                .unwrap_or(-1.0)
            };
            let checks = [
                (v("a", "succeeded"), TASKS as f64),
                (v("b", "succeeded"), ok),
                (v("b", "dead_lettered"), dead),
                (v("c", "succeeded"), ok),
                (
                    m.value("guildhall_tasks_started_total", &[("stage", "a")])
                        .unwrap_or(-1.0),
                    TASKS as f64,
                ),
            ];
            for (i, (got, want)) in checks.iter().enumerate() {
                anyhow::ensure!(got == want, "counter check {i}: {got} != {want}");
            }
            Ok(())
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
