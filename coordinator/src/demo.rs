//! `guildhall demo`: one command that shows Guildhall working.
//!
//! Against the broker at `--amqp-url` it starts the coordinator and a
//! three-stage pipeline, `task_worker -> pm_worker -> result_worker`, with
//! `--agents-per-stage` agents each running a simulated worker (lognormal
//! service times, a small failure rate; `pm_worker` is the slow stage), and
//! feeds it a Poisson stream of tasks. Everything runs in this process; the
//! agents are the real agent library with real broker connections.

use crate::cli::{ConfigError, DemoArgs};
use crate::serve;
use crate::submit::Submitter;
use guildhall_agent::{AgentConfig, AgentHandle, RetryPolicy, SimulateSpec, WorkerSpec};
use guildhall_broker::{Management, Publisher, connect_any, topology};
use guildhall_proto::{AgentId, Stage, TaskId};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The demo pipeline: stage, median service time, retryable and permanent
/// failure probabilities.
const PIPELINE: [(&str, u64, f64, f64); 3] = [
    ("task_worker", 150, 0.03, 0.003),
    ("pm_worker", 400, 0.02, 0.002),
    ("result_worker", 80, 0.01, 0.001),
];

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// RabbitMQ is not there: the error, and the one command that starts
    /// one ([`start_hint`]).
    #[error("{0}. {1}")]
    NoBroker(guildhall_broker::BrokerError, String),
    /// Setting up the pipeline failed.
    #[error("{0}")]
    Broker(#[from] guildhall_broker::BrokerError),
    /// The coordinator failed.
    #[error("{0}")]
    Serve(#[from] serve::ServeError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Where `rabbitmq-server` is, if it is installed here: on `PATH`, or in
/// the Debian package's `sbin` (not on a normal user's `PATH`).
fn installed_server(path: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    std::env::split_paths(path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|candidate| candidate.is_file())
}

/// The one command that starts a broker for the demo: the local server when
/// it is installed and the URL is local, otherwise the container image.
fn start_hint(local: bool, server: Option<std::path::PathBuf>) -> String {
    match server {
        Some(server) if local => format!(
            "RabbitMQ is installed here ({}) but not running: start it with `rabbitmq-server -detached` (as root), then run the demo again",
            server.display()
        ),
        _ => "Start one with `rabbitmq-server -detached` once RabbitMQ is installed (or `docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management`), or point --amqp-url at yours".to_string(),
    }
}

/// Runs the demo until `shutdown` resolves (or `--duration` passes).
pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (config, listen) = args.coordinator.validate(&args.broker)?;
    if !(args.rate > 0.0 && args.rate <= 1000.0) {
        return Err(ConfigError(format!(
            "--rate must be above 0 and at most 1000 tasks/s (got {})",
            args.rate
        ))
        .into());
    }
    if !(1..=20).contains(&args.agents_per_stage) {
        return Err(ConfigError(format!(
            "--agents-per-stage must be between 1 and 20 (got {})",
            args.agents_per_stage
        ))
        .into());
    }
    let names = config.names.clone();
    let conn = connect_any(&config.amqp_url, "guildhall-demo/feeder", None)
        .await
        .map_err(|e| {
            let local = matches!(config.amqp_url.host(), "127.0.0.1" | "localhost" | "::1");
            let path = std::env::var_os("PATH").unwrap_or_default();
            DemoError::NoBroker(e, start_hint(local, installed_server(&path)))
        })?
        .0;
    let publisher = Publisher::open(&conn).await.map_err(DemoError::Broker)?;
    let stages: Vec<Stage> = PIPELINE
        .iter()
        .map(|(s, ..)| Stage::new(*s).expect("valid stage names"))
        .collect();
    for stage in &stages {
        topology::declare_stage(&conn, &names, stage)
            .await
            .map_err(DemoError::Broker)?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DemoError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr()?;

    let stop = CancellationToken::new();
    let coordinator = {
        let stop = stop.clone();
        let config = config.clone();
        tokio::spawn(async move {
            serve::run(config, listener, async move { stop.cancelled().await }).await
        })
    };

    let mut agents: Vec<AgentHandle> = Vec::new();
    for (i, (stage, median_ms, fail, permanent)) in PIPELINE.iter().enumerate() {
        for n in 1..=args.agents_per_stage {
            let spec = SimulateSpec {
                median: Duration::from_millis(*median_ms),
                spread: 0.5,
                fail: *fail,
                permanent: *permanent,
            };
            let agent = AgentConfig::new(stages[i].clone(), WorkerSpec::Simulated(spec))
                .with_amqp_url(config.amqp_url.raw())
                .with_namespace(names.namespace().clone())
                .with_id(AgentId::new(format!("{stage}-{n}")).expect("valid agent id"))
                .with_next(stages.get(i + 1).cloned())
                .with_retry(RetryPolicy {
                    max_attempts: 4,
                    base_delay: Duration::from_millis(500),
                    max_delay: Duration::from_secs(8),
                })
                .with_shutdown_timeout(Duration::from_secs(5));
            agents.push(guildhall_agent::spawn(agent));
        }
    }

    let feeder = {
        let stop = stop.clone();
        let submitter = Submitter::new(
            AgentId::new("demo-feeder").expect("valid id"),
            names.clone(),
        )
        .with_user_id(config.amqp_url.user_id());
        let stage = stages[0].clone();
        let rate = args.rate;
        tokio::spawn(async move { feed(publisher, submitter, stage, rate, stop).await })
    };

    let base = format!("http://{addr}");
    println!(
        "Guildhall demo: namespace {}, broker {}\n\
         \x20 pipeline   {}, {} simulated workers each, ~{} tasks/s\n\
         \x20 API        {base}/api/workers  {base}/api/stages  {base}/api/tasks\n\
         \x20 metrics    {base}/metrics\n\
         \x20 terminal   guildhall status --api-url {base}\n\
         \x20            guildhall trace --api-url {base} <task id>\n\
         Ctrl-C to stop.",
        names.namespace(),
        config.amqp_url.redacted(),
        PIPELINE.map(|(s, ..)| s).join(" -> "),
        args.agents_per_stage,
        args.rate,
    );

    match args.duration {
        Some(d) => tokio::select! {
            _ = shutdown => {}
            _ = tokio::time::sleep(d) => {}
        },
        None => shutdown.await,
    }
    println!("stopping: feeder, then agents (finishing their tasks), then the coordinator");
    stop.cancel();
    let _ = feeder.await;
    for agent in agents {
        if let Err(e) = agent.stop_and_join().await {
            tracing::warn!("agent stopped with an error: {e}");
        }
    }
    let served = coordinator.await;
    let _ = conn.close(200, "demo over".into()).await;
    if args.clean {
        clean(&config, &names.prefix()).await;
    }
    match served {
        Ok(result) => result.map_err(|e| DemoError::Serve(e).into()),
        Err(e) => Err(anyhow::anyhow!("coordinator task failed: {e}")),
    }
}

/// Submits tasks as a Poisson process of `rate` per second until `stop`.
async fn feed(
    publisher: Publisher,
    submitter: Submitter,
    stage: Stage,
    rate: f64,
    stop: CancellationToken,
) {
    let mut n: u64 = 0;
    loop {
        let wait = crate::submit::poisson_gap(rate);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        n += 1;
        let id =
            TaskId::new(format!("demo-{:06}-{:04x}", n, rand::random::<u16>())).expect("valid id");
        let payload = format!("{{\"order\":{n}}}");
        if let Err(e) = submitter
            .submit(&publisher, stage.clone(), Some(id), payload.as_bytes())
            .await
        {
            tracing::warn!("demo feeder: {e}");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Deletes the namespace's queues and exchanges (`--clean`).
async fn clean(config: &serve::ServeConfig, prefix: &str) {
    let Some(url) = &config.management_url else {
        tracing::warn!("--clean needs the management API; nothing deleted");
        return;
    };
    match Management::with_ca(url, config.amqp_url.vhost(), config.management_ca.as_ref()) {
        Ok(m) => match m.delete_all_with_prefix(prefix).await {
            Ok(n) => println!("deleted {n} queues and exchanges under {prefix}"),
            Err(e) => tracing::warn!("clean-up failed: {e}"),
        },
        Err(e) => tracing::warn!("clean-up failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_names_the_installed_server_only_for_a_local_url() {
        let dir = std::env::temp_dir().join(format!("guildhall-demo-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = dir.join("rabbitmq-server");
        std::fs::write(&server, "#!/bin/sh\n").expect("fake server");
        let path = std::env::join_paths([&dir]).expect("path");
        let found = installed_server(&path);
        assert_eq!(found.as_deref(), Some(server.as_path()));
        let hint = start_hint(true, found.clone());
        assert!(hint.contains("installed here"), "{hint}");
        assert!(hint.contains(&server.display().to_string()), "{hint}");
        assert!(hint.contains("`rabbitmq-server -detached`"), "{hint}");
        // A remote URL: starting the local server would not help.
        let remote = start_hint(false, found);
        assert!(remote.contains("docker run"), "{remote}");
        assert!(!remote.contains("installed here"), "{remote}");
        // Nothing installed.
        let none = start_hint(true, None);
        assert!(
            none.contains("docker run") && none.contains("rabbitmq-server -detached"),
            "{none}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
