//! Agents run in this process through the library API
//! ([`guildhall_agent::spawn`]), for tests that read what only the library
//! gives: the [`guildhall_agent::AgentExit`] counters, the error a run ends
//! with. [`agent_config`] is the one place with the arguments every such
//! agent shares; [`start_agent`] starts one and waits until it consumes.
//! Tests of the binary itself use [`crate::spawn_agent`].

use crate::{Broker, TestNs, amqp_url, eventually};
use anyhow::Context;
use guildhall_agent::{AgentConfig, AgentHandle, WorkerSpec};
use guildhall_proto::AgentId;
use std::time::Duration;

/// A config for an agent of `ns` serving `stage` (results to `next`) with
/// `worker`: a random id `<stage>-<4 hex>`, the test broker, heartbeats
/// every 200 ms and events flushed every 10 ms.
pub fn agent_config(
    ns: &TestNs,
    stage: &str,
    next: Option<&str>,
    worker: WorkerSpec,
) -> AgentConfig {
    let id: AgentId = format!("{stage}-{:04x}", rand::random::<u16>())
        .parse()
        .expect("a valid agent id");
    let mut config = AgentConfig::new(TestNs::stage(stage), worker)
        .with_amqp_url(amqp_url())
        .with_namespace(ns.ns.clone())
        .with_next(next.map(TestNs::stage))
        .with_id(id)
        .with_heartbeat(Duration::from_millis(200));
    config.flush_interval = Duration::from_millis(10);
    config
}

/// A worker that runs `command` with `sh -c`, one process per task.
pub fn exec(command: &str) -> WorkerSpec {
    WorkerSpec::Exec {
        command: command.into(),
    }
}

/// Starts an agent in process and waits (up to 10 s) until it consumes its
/// stage queue. An agent still running when the test ends (it failed) is
/// closed by [`TestNs`]'s clean-up.
pub async fn start_agent(broker: &Broker, config: AgentConfig) -> AgentHandle {
    let queue = broker.names.stage_queue(&config.stage);
    let agent = guildhall_agent::spawn(config);
    eventually(Duration::from_secs(10), "the agent to consume", || async {
        assert!(!agent.is_finished(), "the agent ended early");
        let (_, consumers) = broker.probe(&queue).await.context("no stage queue")?;
        anyhow::ensure!(consumers == 1, "{consumers} consumers");
        Ok(())
    })
    .await;
    agent
}
