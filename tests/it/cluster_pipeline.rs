//! The whole system on a private 3-node RabbitMQ cluster (issue 20): two
//! stages (`a` → `b` → a sink no one consumes), two agents on each, one
//! HTTP worker behind them, and coordinators of the namespace, every
//! process given all three nodes. 1,200 tasks go through in four batches,
//! one before each blow:
//!
//! 1. the node the leading coordinator holds its lock on is SIGKILLed
//!    (agents on it too): another leader acts, every agent is heard again;
//! 2. a node the leader does not use is SIGKILLed and restarted: no worker
//!    is declared dead and the leadership does not move;
//! 3. an agent freezes and the leading coordinator is SIGKILLed, then the
//!    next leader is SIGSTOPped: each time another one leads, the frozen
//!    agent's connection is closed once, by one of them;
//! 4. the whole cluster stops and starts.
//!
//! Every task reaches the sink: none lost; duplicates (the broker is at
//! least once) are counted and printed, with the timings (`cluster
//! timing:` lines, figures for BENCHMARKS.md, asserted only loosely).

use anyhow::{Context, bail, ensure};
use guildhall_tests::*;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Tasks per batch; four batches.
const BATCH: usize = 300;
/// What each task asks of the worker: a little work at each stage, so
/// that tasks are in hand when the blows fall.
const PAYLOAD: &str = "sleep=100";

fn timing(what: &str, d: Duration) {
    eprintln!("cluster timing: {what}: {:.1} s", d.as_secs_f64());
}

/// The rig: the cluster, the processes and what was published.
struct Rig {
    ns: TestNs,
    cluster: RabbitCluster,
    coordinators: Vec<Option<Coordinator>>,
    agents: Vec<Agent>,
    worker: HttpWorker,
    /// Every task id published.
    published: BTreeSet<String>,
    /// Every task id read from the sink, and how many times.
    sunk: HashMap<String, u32>,
}

impl Rig {
    fn live(&self) -> impl Iterator<Item = (usize, &Coordinator)> {
        self.coordinators
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
    }

    /// A running node other than `avoid`.
    fn other_node(&self, avoid: &[usize]) -> usize {
        (0..3)
            .find(|i| !avoid.contains(i) && self.cluster.pid(*i).is_some())
            .expect("a running node")
    }

    /// Publishes `BATCH` tasks `<prefix>-NNNN` to stage `a` through node
    /// `node`, each confirmed.
    async fn publish(&mut self, prefix: &str, node: usize) {
        let broker = Broker::connect_to(&self.ns, &self.cluster.amqp_url(node))
            .await
            .unwrap();
        for i in 0..BATCH {
            let id = format!("{prefix}-{i:04}");
            broker.publish_task("a", &id, PAYLOAD).await.unwrap();
            self.published.insert(id);
        }
    }

    /// Reads what the sink holds now through node `node` (removing it).
    async fn drain_sink(&mut self, node: usize) -> anyhow::Result<()> {
        let broker = Broker::connect_to(&self.ns, &self.cluster.amqp_url(node)).await?;
        let sink = self.ns.names.stage_queue(&TestNs::stage("sink"));
        for (id, _, _) in broker.drain(&sink).await? {
            *self.sunk.entry(id).or_default() += 1;
        }
        Ok(())
    }

    /// Waits until at least `n` tasks have reached the sink.
    async fn wait_sunk(&mut self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let node = self.other_node(&[]);
            if let Err(e) = self.drain_sink(node).await {
                eprintln!("draining the sink: {e:#}");
            }
            if self.sunk.len() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {n} tasks in the sink",
                self.sunk.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The index of the one coordinator acting as the leader (waits until
    /// exactly one does), with its epoch.
    async fn leader(&self, what: &str) -> (usize, u64) {
        eventually(Duration::from_secs(30), what, || async {
            let mut acting = Vec::new();
            for (i, c) in self.live() {
                let v = c.api.get_ok("/api/cluster").await?;
                if v["acting"] == true {
                    acting.push((i, v["epoch"].as_u64().unwrap_or(0)));
                }
            }
            ensure!(acting.len() == 1, "acting: {acting:?}");
            Ok(acting[0])
        })
        .await
    }

    /// The node (index) `coordinator`'s leader lock connection is on.
    async fn lock_node(&self, coordinator: usize) -> usize {
        let c = self.coordinators[coordinator].as_ref().expect("running");
        let id = c.api.get_ok("/api/cluster").await.unwrap()["coordinator"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let suffix = id.trim_start_matches("coordinator-").to_owned();
        let name = format!("guildhall-coordinator/{suffix}/lock");
        self.node_of(&name).await
    }

    /// The node (index) the connection named `name` is on (the management
    /// API lists a connection a few seconds after it opens).
    async fn node_of(&self, name: &str) -> usize {
        let names = self.cluster.names();
        eventually(
            Duration::from_secs(20),
            &format!("{name} listed"),
            || async {
                let i = self.other_node(&[]);
                let list = self.cluster.get_json(i, &["connections"]).await?;
                for conn in list.as_array().context("a list")? {
                    if conn["user_provided_name"] == name {
                        let node = conn["node"].as_str().unwrap_or_default();
                        return names
                            .iter()
                            .position(|n| n == node)
                            .context("a node of the cluster");
                    }
                }
                bail!("not listed")
            },
        )
        .await
    }

    /// A metric's value on coordinator `i` (0 when absent).
    async fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        let c = self.coordinators[i].as_ref().expect("running");
        c.api
            .metrics()
            .await
            .unwrap()
            .value(name, labels)
            .unwrap_or(0.0)
    }

    /// Sum of a metric over the running coordinators but `except`.
    async fn metric_sum_but(
        &self,
        except: Option<usize>,
        name: &str,
        labels: &[(&str, &str)],
    ) -> f64 {
        let mut sum = 0.0;
        for (i, _) in self.live() {
            if Some(i) != except {
                sum += self.metric(i, name, labels).await;
            }
        }
        sum
    }

    /// Sum of a metric over the running coordinators.
    async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric_sum_but(None, name, labels).await
    }

    /// Waits until coordinator `i` hears every agent: idle or processing, and
    /// seen since `since`.
    async fn all_agents_heard(&self, i: usize, since: Instant, what: &str) {
        let c = self.coordinators[i].as_ref().expect("running");
        let ids: Vec<String> = self.agents.iter().map(|a| a.id.clone()).collect();
        eventually(Duration::from_secs(90), what, || async {
            let w = c.api.get_ok("/api/workers").await?;
            let list = w["workers"].as_array().cloned().unwrap_or_default();
            for id in &ids {
                let worker = list
                    .iter()
                    .find(|w| w["id"] == id.as_str())
                    .with_context(|| format!("{id} not listed"))?;
                let status = worker["status"].as_str().unwrap_or_default();
                let ago = worker["last_seen_ago_ms"].as_u64().unwrap_or(u64::MAX);
                ensure!(
                    matches!(status, "idle" | "processing")
                        && ago < since.elapsed().as_millis() as u64,
                    "{id}: {status}, seen {ago} ms ago"
                );
            }
            Ok(())
        })
        .await;
    }

    /// The nodes (indexes) the agents' connections are on.
    async fn agent_nodes(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for a in &self.agents {
            let name = self
                .ns
                .names
                .agent_connection_name(&a.id.parse().expect("an agent id"));
            out.push((a.id.clone(), self.node_of(&name).await));
        }
        out
    }
}

/// Names of the namespace's queues with their leader's node (a stream's
/// is its `node`), asked of node `i`.
async fn leaders(cluster: &RabbitCluster, i: usize, prefix: &str) -> Vec<(String, String)> {
    let list: Value = cluster.get_json(i, &["queues", "/"]).await.unwrap();
    list.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|q| {
            (
                q["name"].as_str().unwrap_or_default().to_owned(),
                q["leader"]
                    .as_str()
                    .or(q["node"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_on_a_three_node_cluster_loses_nodes_and_coordinators_and_no_task() {
    let ns = TestNs::exclusive("clpipe");
    let t = Instant::now();
    let cluster = spawn_rabbitmq_cluster(&ns, "cp").await.unwrap();
    timing("three nodes started and clustered", t.elapsed());
    let urls = cluster.amqp_url_list();
    let mgmt = cluster.management_url_list();

    // Declarations through node 1: replicas on every node, leaders spread.
    {
        let first = Broker::connect_to(&ns, &cluster.amqp_url(0)).await.unwrap();
        for stage in ["a", "b", "sink"] {
            first.declare_stage(stage).await.unwrap();
        }
        first.ensure_events_stream().await.unwrap();
        let placed = leaders(&cluster, 0, &format!("{}.", ns.name())).await;
        let nodes: BTreeSet<&str> = placed
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| !l.is_empty())
            .collect();
        assert!(
            nodes.len() >= 2,
            "leaders spread over the nodes, not all on the declaring one: {placed:?}"
        );
        let stage_a = ns.names.stage_queue(&TestNs::stage("a"));
        let m = cluster.queue_members(0, &stage_a).await.unwrap();
        assert_eq!(m.members.len(), 3, "{m:?}");
    }

    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let coordinator_args = [
        "--amqp-url",
        urls.as_str(),
        "--management-url",
        mgmt.as_str(),
    ];
    let mut coordinators = Vec::new();
    for _ in 0..2 {
        coordinators.push(Some(
            spawn_coordinator(&ns, &coordinator_args).await.unwrap(),
        ));
    }
    let mut agents = Vec::new();
    for (id, stage, next) in [
        ("a1", "a", "b"),
        ("a2", "a", "b"),
        ("b1", "b", "sink"),
        ("b2", "b", "sink"),
    ] {
        let args = [
            "--amqp-url",
            urls.as_str(),
            "--next",
            next,
            "--heartbeat",
            "1s",
            "--concurrency",
            "2",
            "--worker-url",
            worker.url.as_str(),
        ];
        agents.push(spawn_agent(&ns, id, stage, &args).await.unwrap());
    }
    let mut rig = Rig {
        ns,
        cluster,
        coordinators,
        agents,
        worker,
        published: BTreeSet::new(),
        sunk: HashMap::new(),
    };
    let (leader, epoch) = rig.leader("one leader of two").await;
    rig.all_agents_heard(leader, Instant::now(), "four agents heard")
        .await;

    // (1) The leader's node dies, with whatever agents are on it.
    let node = rig.lock_node(leader).await;
    let via = rig.other_node(&[node]);
    rig.publish("K", via).await;
    rig.wait_sunk(20, "the first batch flowing").await;
    let on: Vec<String> = rig
        .agent_nodes()
        .await
        .into_iter()
        .filter(|(_, n)| *n == node)
        .map(|(id, _)| id)
        .collect();
    let events = rig
        .cluster
        .queue_members(via, &rig.ns.names.events_stream())
        .await
        .map(|m| m.leader)
        .unwrap_or_default();
    eprintln!(
        "cluster: killing node {} ({}) with the leader's lock and agents {on:?}; \
         the events stream's leader is {events}",
        node + 1,
        rig.cluster.names()[node]
    );
    let killed = Instant::now();
    rig.cluster.kill(node);
    let (leader, epoch1) = rig.leader("a leader after the node's loss").await;
    timing(
        "a leader acting after its node was SIGKILLed",
        killed.elapsed(),
    );
    assert!(epoch1 > epoch, "a new election: {epoch1} after {epoch}");
    rig.all_agents_heard(leader, killed, "every agent heard after the node's loss")
        .await;
    timing(
        "every agent heard again after the node was SIGKILLed",
        killed.elapsed(),
    );
    let t = Instant::now();
    rig.cluster.start(node).await.unwrap();
    timing("the node restarted and rejoined", t.elapsed());

    // (2) A node the leader does not hold its lock on dies and comes back:
    // no worker is declared dead, the leadership stays.
    let lock = rig.lock_node(leader).await;
    let victim = rig.other_node(&[lock]);
    let deaths = rig.metric_sum("guildhall_worker_deaths_total", &[]).await;
    rig.publish("F", rig.other_node(&[victim])).await;
    let before = rig.sunk.len();
    rig.wait_sunk(before + 20, "the second batch flowing").await;
    let killed = Instant::now();
    rig.cluster.kill(victim);
    rig.all_agents_heard(
        leader,
        killed,
        "every agent heard after a follower node's loss",
    )
    .await;
    let t = Instant::now();
    rig.cluster.start(victim).await.unwrap();
    timing("the follower node restarted and rejoined", t.elapsed());
    rig.all_agents_heard(leader, Instant::now(), "every agent heard")
        .await;
    assert_eq!(
        rig.leader("the same leader").await,
        (leader, epoch1),
        "the leadership did not move"
    );
    assert_eq!(
        rig.metric_sum("guildhall_worker_deaths_total", &[]).await,
        deaths,
        "no worker declared dead for a follower node's loss"
    );

    // (3) A frozen agent while the leader is SIGKILLed, then the next
    // leader SIGSTOPped.
    let standby = spawn_coordinator(&rig.ns, &coordinator_args).await.unwrap();
    rig.coordinators.push(Some(standby));
    eventually(Duration::from_secs(20), "the standby follows", || async {
        let c = rig.coordinators[2].as_ref().expect("running");
        let v = c.api.get_ok("/api/cluster").await?;
        ensure!(v["leader"]["epoch"].as_u64() == Some(epoch1), "{v}");
        Ok(())
    })
    .await;
    rig.publish("S", rig.other_node(&[])).await;
    let before = rig.sunk.len();
    rig.wait_sunk(before + 20, "the third batch flowing").await;
    // Counts of the coordinators that will be left: the leader's die
    // with it.
    let closes = rig
        .metric_sum_but(
            Some(leader),
            "guildhall_leader_actions_total",
            &[("action", "close_connection")],
        )
        .await;
    let closed = rig
        .metric_sum_but(
            Some(leader),
            "guildhall_connections_closed_total",
            &[("outcome", "closed")],
        )
        .await;
    let frozen = rig.agents[0].proc.pid();
    rig.agents[0].proc.signal("STOP");
    let killed = Instant::now();
    let mut dead = rig.coordinators[leader].take().expect("running");
    dead.proc.signal("KILL");
    let _ = dead.proc.child.wait().await;
    let (next, epoch2) = rig.leader("a leader after the leader's SIGKILL").await;
    timing(
        "a leader acting after the leader was SIGKILLed",
        killed.elapsed(),
    );
    assert!(epoch2 > epoch1);
    eventually(
        Duration::from_secs(30),
        "the frozen agent's connection closed",
        || async {
            let now = rig
                .metric_sum(
                    "guildhall_connections_closed_total",
                    &[("outcome", "closed")],
                )
                .await;
            ensure!(now > closed, "closed: {now}");
            Ok(())
        },
    )
    .await;
    timing(
        "the frozen agent's connection closed after the leader's SIGKILL",
        killed.elapsed(),
    );
    signal_pid(frozen, "CONT");
    rig.all_agents_heard(next, Instant::now(), "the frozen agent back")
        .await;
    let stopped = Instant::now();
    rig.coordinators[next]
        .as_ref()
        .expect("running")
        .proc
        .signal("STOP");
    let woken = next;
    // The stopped one cannot answer: ask the others.
    let others: Vec<usize> = rig.live().map(|(i, _)| i).filter(|i| *i != woken).collect();
    let (third, epoch3) = eventually(
        Duration::from_secs(30),
        "a leader after the SIGSTOP",
        || async {
            for &i in &others {
                let c = rig.coordinators[i].as_ref().expect("running");
                let v = c.api.get_ok("/api/cluster").await?;
                if v["acting"] == true {
                    return Ok((i, v["epoch"].as_u64().unwrap_or(0)));
                }
            }
            bail!("no one acts")
        },
    )
    .await;
    timing(
        "a leader acting after the leader was SIGSTOPped",
        stopped.elapsed(),
    );
    assert!(epoch3 > epoch2);
    rig.coordinators[woken]
        .as_ref()
        .expect("running")
        .proc
        .signal("CONT");
    assert_eq!(rig.leader("one leader after the wake-up").await.0, third);
    // One death, one close, by one of the coordinators that are left (the
    // killed one could not have: the agent froze just before it died).
    assert_eq!(
        rig.metric_sum(
            "guildhall_leader_actions_total",
            &[("action", "close_connection")]
        )
        .await,
        closes + 1.0,
        "the frozen agent's connection closed once"
    );
    assert_eq!(
        rig.metric_sum(
            "guildhall_connections_closed_total",
            &[("outcome", "closed")]
        )
        .await,
        closed + 1.0,
        "one connection closed"
    );

    // (4) The whole cluster stops and starts.
    rig.publish("R", rig.other_node(&[])).await;
    let before = rig.sunk.len();
    rig.wait_sunk(before + 20, "the fourth batch flowing").await;
    let t = Instant::now();
    rig.cluster.stop_all();
    timing("whole cluster stopped", t.elapsed());
    let t = Instant::now();
    rig.cluster.start_all().await.unwrap();
    timing("whole cluster started", t.elapsed());
    let (leader, _) = rig.leader("a leader after the restart").await;
    rig.all_agents_heard(leader, t, "every agent heard after the restart")
        .await;
    timing(
        "a leader and every agent back after the whole cluster started",
        t.elapsed(),
    );

    // Nothing lost; duplicates counted.
    let all = rig.published.len();
    rig.wait_sunk(all, "every task in the sink").await;
    let lost: Vec<_> = rig
        .published
        .iter()
        .filter(|id| !rig.sunk.contains_key(*id))
        .take(10)
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let extra: u32 = rig.sunk.values().map(|n| n - 1).sum();
    let calls = rig.worker.calls().await.unwrap();
    let processed: u32 = calls.values().sum();
    eprintln!(
        "cluster: {all} tasks published, {} reached the sink, {extra} of them again; \
         the worker ran {processed} stage attempts for {} ({} more than once each)",
        rig.sunk.len(),
        2 * all,
        i64::from(processed) - 2 * all as i64
    );
}
