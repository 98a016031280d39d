//! A private 3-node RabbitMQ cluster for one test, beside the machine's own
//! `rabbit@localhost` (which is never touched): three plain nodes of
//! [`crate::node`] (own node names, ports, data, logs, config and env
//! files, run as the `rabbitmq` user so that they and `rabbitmqctl` share
//! its Erlang cookie), nodes 2 and 3 joined to node 1 with `rabbitmqctl
//! join_cluster`. **Everything is killed and deleted when it is dropped**, a
//! failed test included.
//!
//! What a test can do to it: [`RabbitCluster::kill`] one node (SIGKILL, a
//! crash) and [`RabbitCluster::start`] it again (it rejoins on its own
//! data); [`RabbitCluster::stop_all`] and [`RabbitCluster::start_all`] (a
//! whole-cluster restart); ask where a queue's replicas and leader are
//! ([`RabbitCluster::queue_members`]).
//!
//! The nodes run with `cluster_partition_handling = pause_minority`, the
//! setting the README asks of a production cluster.
//!
//! Timings on a 2-core machine: ~40 s from nothing to three clustered
//! nodes, ~15 s for one node to restart and rejoin. Needs root, like
//! [`crate::node`].

use crate::node::{RabbitNode, create_node};
use crate::{TestNs, try_eventually};
use anyhow::{Context, bail};
use guildhall_broker::Management;
use serde_json::Value;
use std::time::Duration;

/// The CLI of Debian's package, run as the `rabbitmq` user (its cookie).
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// Longest the nodes may take to see each other running after a join or a
/// start.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a node may take to stop gracefully before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// `rabbitmq.conf` lines every node gets besides its listeners.
const CLUSTER_CONFIG: &str = "cluster_partition_handling = pause_minority\n";

/// Where a queue's replicas are, as the management API reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMembers {
    /// The node of its leader (RabbitMQ 3.10 gives a quorum queue's as
    /// `leader`, a stream's as `node`); `""` when the API names none.
    pub leader: String,
    /// Every node with a replica.
    pub members: Vec<String>,
    /// The members that are running.
    pub online: Vec<String>,
}

/// Three clustered private nodes; killed, and their files deleted, on drop.
pub struct RabbitCluster {
    /// Node 1, 2 and 3 (indices 0, 1, 2); 2 and 3 joined 1.
    nodes: [RabbitNode; 3],
    /// Indices of the nodes that are down, in the order they went down: a
    /// whole-cluster start boots the last one first.
    down: Vec<usize>,
}

/// Starts three private nodes at once, joins nodes 2 and 3 to node 1, and
/// waits until every node runs and sees the other two running. Node logs go
/// to `<test log dir>/rabbitmq-<label><1|2|3>.log` when the cluster is
/// dropped.
pub async fn spawn_rabbitmq_cluster(ns: &TestNs, label: &str) -> anyhow::Result<RabbitCluster> {
    let node = |i: usize| create_node(ns, &format!("{label}{}", i + 1), None, CLUSTER_CONFIG);
    // Created one by one (each drops, killed, if a later one fails), booted
    // together.
    let mut cluster = RabbitCluster {
        nodes: [node(0)?, node(1)?, node(2)?],
        down: Vec::new(),
    };
    cluster.wait_all_started().await?;
    let first = cluster.nodes[0].name().to_owned();
    for i in 1..3 {
        let name = cluster.nodes[i].name().to_owned();
        ctl(&name, &["stop_app"]).await?;
        ctl(&name, &["join_cluster", &first]).await?;
        ctl(&name, &["start_app"]).await?;
    }
    cluster.wait_all_started().await?;
    cluster.wait_clustered(0).await?;
    Ok(cluster)
}

impl RabbitCluster {
    /// The nodes, node 1 first.
    pub fn nodes(&self) -> &[RabbitNode; 3] {
        &self.nodes
    }

    /// Node `i` (0, 1 or 2).
    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    /// Node `i`'s AMQP URL, `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self, i: usize) -> String {
        self.nodes[i].amqp_url()
    }

    /// Every node's AMQP URL, node 1 first.
    pub fn amqp_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }

    /// Every node's AMQP URL as one comma-separated list (an `--amqp-url`
    /// value naming the whole cluster).
    pub fn amqp_url_list(&self) -> String {
        self.amqp_urls().join(",")
    }

    /// Node `i`'s management API, `http://guest:guest@127.0.0.1:<port>`.
    pub fn management_url(&self, i: usize) -> String {
        self.nodes[i].management_url()
    }

    /// Every node's management URL as one comma-separated list.
    pub fn management_url_list(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RabbitNode::management_url).collect();
        urls.join(",")
    }

    /// Node `i`'s Erlang VM pid (`None` while it is down).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// Every node's Erlang name, node 1 first.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name().to_owned()).collect()
    }

    /// SIGKILLs node `i`'s Erlang VM (found from its pid file) and waits
    /// until its processes are gone: a crash. Its data stays.
    pub fn kill(&mut self, i: usize) {
        if self.nodes[i].is_running() {
            self.nodes[i].kill();
            self.down.push(i);
        }
    }

    /// Starts node `i` again on its data and waits until it runs and sees
    /// the other running nodes (it rejoined the cluster).
    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].launch()?;
        self.down.retain(|&d| d != i);
        self.boot_waiting().await?;
        self.wait_clustered(i).await
    }

    /// Stops every running node gracefully, node 3 first, node 1 last (the
    /// one [`RabbitCluster::start_all`] boots first).
    pub fn stop_all(&mut self) {
        for i in (0..3).rev() {
            if self.nodes[i].is_running() {
                self.nodes[i].shut_down(SHUTDOWN_TIMEOUT);
                self.down.push(i);
            }
        }
    }

    /// Starts every stopped node and waits until all three run and see each
    /// other. RabbitMQ 3.10: the last node to go down boots without waiting
    /// for any peer; every other node waits for a peer it knew running (up
    /// to 10 x 30 s, `mnesia_table_loading_retry_*`) and fails to boot
    /// after that, so they are all started together, the last one down
    /// first.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for &i in self.down.iter().rev() {
            self.nodes[i].launch()?;
        }
        self.down.clear();
        self.boot_waiting().await?;
        self.wait_clustered(0).await
    }

    /// Waits until every launched node answers. RabbitMQ 3.10: a node that
    /// boots while a peer is booting too may fail to sync feature flags
    /// with it (`incompatible_feature_flags`, a `badmap` in
    /// `rabbit_feature_flags:enable_dependencies`) and exit; it boots once
    /// started again, as a supervisor would. One such retry.
    async fn boot_waiting(&mut self) -> anyhow::Result<()> {
        let Err(first) = self.wait_all_started().await else {
            return Ok(());
        };
        let mut again = false;
        for node in &mut self.nodes {
            again |= node.relaunch_if_exited()?;
        }
        if !again {
            return Err(first);
        }
        eprintln!("cluster: a node exited at boot, started again: {first:#}");
        self.wait_all_started().await
    }

    /// A management API client of node `i` (vhost `/`).
    pub fn management(&self, i: usize) -> anyhow::Result<Management> {
        self.nodes[i].management()
    }

    /// Where `queue` (vhost `/`) has replicas, asked of node `i`'s
    /// management API (`members`, `online` and `leader` of a quorum queue
    /// or a stream).
    pub async fn queue_members(&self, i: usize, queue: &str) -> anyhow::Result<QueueMembers> {
        let info = self.get_json(i, &["queues", "/", queue]).await?;
        let names = |key: &str| -> Vec<String> {
            let mut v: Vec<String> = info[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        Ok(QueueMembers {
            // A quorum queue names its leader `leader`; a stream, `node`.
            leader: info["leader"]
                .as_str()
                .or(info["node"].as_str())
                .unwrap_or_default()
                .to_owned(),
            members: names("members"),
            online: names("online"),
        })
    }

    /// GET `/api/<segments>` on node `i`'s management API, as JSON.
    pub async fn get_json(&self, i: usize, segments: &[&str]) -> anyhow::Result<Value> {
        let what = segments.join("/");
        let response = self
            .management(i)?
            .request(reqwest::Method::GET, segments)
            .send()
            .await
            .with_context(|| format!("GET /api/{what} on {}", self.nodes[i].name()))?;
        let status = response.status();
        if !status.is_success() {
            bail!("GET /api/{what} on {}: {status}", self.nodes[i].name());
        }
        Ok(response.json().await?)
    }

    /// Waits until every launched node answers on its management API.
    async fn wait_all_started(&mut self) -> anyhow::Result<()> {
        async fn wait(node: &mut RabbitNode) -> anyhow::Result<()> {
            match node.is_running() {
                true => node.wait_started().await,
                false => Ok(()),
            }
        }
        let [a, b, c] = &mut self.nodes;
        tokio::try_join!(wait(a), wait(b), wait(c))?;
        Ok(())
    }

    /// Waits until node `i` sees every running node of the cluster running
    /// (`GET /api/nodes`), and no other node.
    async fn wait_clustered(&self, i: usize) -> anyhow::Result<()> {
        let mut expected: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.name().to_owned())
            .collect();
        expected.sort();
        let result = try_eventually(
            CLUSTER_TIMEOUT,
            &format!("{} to see {expected:?} running", self.nodes[i].name()),
            || async {
                let nodes = self.get_json(i, &["nodes"]).await?;
                let mut running: Vec<String> = nodes
                    .as_array()
                    .context("GET /api/nodes: not an array")?
                    .iter()
                    .filter(|n| n["running"].as_bool() == Some(true))
                    .filter_map(|n| n["name"].as_str().map(str::to_owned))
                    .collect();
                running.sort();
                if running != expected {
                    bail!("running: {running:?}");
                }
                Ok(())
            },
        )
        .await;
        result.with_context(|| self.nodes[i].failure_output())
    }
}

/// `rabbitmqctl -n <node> <args>` as the `rabbitmq` user; its output, or
/// an error with it.
async fn ctl(node: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("runuser")
        .args(["-u", "rabbitmq", "--", CTL, "-n", node])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("cannot run runuser -u rabbitmq -- rabbitmqctl")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "rabbitmqctl -n {node} {} failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}
