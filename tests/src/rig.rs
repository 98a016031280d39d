//! [`Rig`]: the set-up every priority and delay test starts from, and what
//! those tests publish and read like a third-party producer: plain lapin
//! publishes ([`publish_plain`], [`header`]) and a dead letter's reason
//! headers ([`reasons`]).

use crate::events::EventReader;
use crate::{Agent, Broker, HttpWorker, TestNs, spawn_agent, spawn_http_worker};
use guildhall_proto::headers::amqp as h;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};

/// One stage `work` (and `extra_stages`) with the events stream, an HTTP
/// worker and one agent, `work-1`, given `flags` after its `--worker-url`:
/// the set-up every priority and delay test starts from.
pub struct Rig {
    /// The broker, the stages declared.
    pub broker: Broker,
    /// The worker the agent calls.
    pub worker: HttpWorker,
    /// The agent, kept for the test's length (stopped when dropped).
    pub _agent: Agent,
}

impl Rig {
    /// Starts it in `ns`.
    pub async fn start(ns: &TestNs, extra_stages: &[&str], flags: &[&str]) -> Rig {
        let broker = Broker::connect(ns).await.unwrap();
        broker.ensure_events_stream().await.unwrap();
        for stage in std::iter::once(&"work").chain(extra_stages) {
            broker.declare_stage(stage).await.unwrap();
        }
        let worker = spawn_http_worker(ns, "worker").await.unwrap();
        let mut args = vec!["--worker-url", worker.url.as_str()];
        args.extend_from_slice(flags);
        let agent = spawn_agent(ns, "work-1", "work", &args).await.unwrap();
        Rig {
            broker,
            worker,
            _agent: agent,
        }
    }

    /// A reader of the events stream from its start.
    pub async fn events(&self) -> EventReader {
        EventReader::open(&self.broker.conn, &self.broker.names)
            .await
            .unwrap()
    }
}

/// Publishes like a third party: plain lapin, the properties given.
pub async fn publish_plain(
    broker: &Broker,
    stage: &str,
    id: &str,
    payload: &str,
    props: BasicProperties,
) {
    broker
        .channel
        .basic_publish(
            broker.names.tasks_exchange().as_str().into(),
            stage.into(),
            BasicPublishOptions::default(),
            payload.as_bytes(),
            props.with_message_id(id.into()).with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A header table with one text header.
pub fn header(key: &str, value: AMQPValue) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(key.into(), value);
    t
}

/// The reason headers of a dead letter: (class, error).
pub fn reasons(headers: &FieldTable) -> (String, String) {
    let text = |k: &str| guildhall_broker::task::header_str(headers, k).unwrap_or_default();
    (text(h::ERROR_CLASS), text(h::LAST_ERROR))
}
