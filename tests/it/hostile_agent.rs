//! Hostile input reaching agents (issue 16): poison messages on a stage
//! queue, an exec worker whose background child holds its pipes, a worker
//! naming a next stage that does not exist or cannot be one, a message
//! timestamp that overflows. Real broker, real `guildhall-agent` and
//! `guildhall serve` binaries; raw AMQP frames for what lapin cannot send.

use guildhall_broker::task::{TaskMeta, header_str};
use guildhall_broker::{Management, now_ms};
use guildhall_proto::Event;
use guildhall_proto::headers::amqp as h;
use guildhall_tests::raw_amqp::{self, RawMessage};
use guildhall_tests::*;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use std::collections::BTreeSet;
use std::time::Duration;

/// Ready messages in `queue`; `None` if the queue does not exist.
async fn ready(broker: &Broker, queue: &str) -> anyhow::Result<Option<u32>> {
    // A stage's intake counts its bands (see `Broker::probe`); a probe the
    // broker refuses for now (`noproc`) is an error `eventually` retries.
    Ok(broker.try_probe(queue).await?.map(|p| p.0))
}

/// The management API's name of each agent's connection (it holds the
/// client's port: a reconnect changes it), once all are listed.
async fn connection_names(ns: &TestNs, agents: &[&str]) -> Vec<String> {
    let management = Management::new(&management_url(), "/").unwrap();
    eventually(
        Duration::from_secs(30),
        "the agents' connections to be listed",
        || async {
            let listed = management.connections().await?;
            agents
                .iter()
                .map(|id| {
                    let wanted = format!("guildhall-agent/{}/{id}", ns.name());
                    let found: Vec<_> = listed
                        .iter()
                        .filter(|c| c.user_provided_name.as_deref() == Some(wanted.as_str()))
                        .map(|c| c.name.clone())
                        .collect();
                    match found.as_slice() {
                        [one] => Ok(one.clone()),
                        other => anyhow::bail!("{id}: {} connections", other.len()),
                    }
                })
                .collect()
        },
    )
    .await
}

fn text(headers: &FieldTable, key: &str) -> Option<String> {
    header_str(headers, key)
}

/// The reproduction of issue 16, item 1: 16 tasks on a stage served by two
/// agents at concurrency 4, and among them messages whose `message_id` is
/// not UTF-8 (one of them with a header table that fills a frame) and one
/// with a header name that is not UTF-8. Every innocent task completes,
/// each poison is dead-lettered with its reasons and counted once, and no
/// agent loses its connection.
#[tokio::test]
async fn poison_messages_are_dead_lettered_and_break_no_connection() {
    let ns = TestNs::new("hostile-agent");
    let coordinator = spawn_coordinator(&ns, &[]).await.unwrap();
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("p1").await.unwrap();
    let stage_queue = ns.names.stage_queue(&TestNs::stage("p1"));
    let dead_queue = ns.names.dead_queue(&TestNs::stage("p1"));
    let next_queue = ns.names.stage_queue(&TestNs::stage("p2"));
    let url = amqp_url();
    let poison = RawMessage {
        message_id: Some(b"\xc3\x28".to_vec()),
        body: b"\x01x".to_vec(),
        ..Default::default()
    };
    // Fills a 131072-byte frame but for a few hundred bytes: the dead
    // letter, with the reason headers, would not fit as it came.
    let fat_poison = RawMessage {
        message_id: Some(b"\xff\xfe".to_vec()),
        headers: vec![(b"big".to_vec(), vec![b'x'; 130_900])],
        body: b"fat".to_vec(),
        ..Default::default()
    };
    // A valid task, but a header name that is not UTF-8: a task like any other.
    let odd_header = RawMessage {
        message_id: Some(b"ODD-1".to_vec()),
        headers: vec![(b"x-\xff\xfe".to_vec(), b"v".to_vec())],
        body: b"odd".to_vec(),
        ..Default::default()
    };
    for i in 0..8 {
        broker
            .publish_task("p1", &format!("T-{i}"), "x")
            .await
            .unwrap();
    }
    raw_amqp::publish(&url, "", &stage_queue, &poison)
        .await
        .unwrap();
    raw_amqp::publish(&url, "", &stage_queue, &fat_poison)
        .await
        .unwrap();
    raw_amqp::publish(&url, "", &stage_queue, &odd_header)
        .await
        .unwrap();
    for i in 8..16 {
        broker
            .publish_task("p1", &format!("T-{i}"), "x")
            .await
            .unwrap();
    }
    let mut agents = Vec::new();
    for id in ["h1", "h2"] {
        let agent = spawn_agent(
            &ns,
            id,
            "p1",
            &[
                "--next",
                "p2",
                "--concurrency",
                "4",
                "--simulate",
                "median=150ms,spread=0.2",
                "--heartbeat",
                "500ms",
            ],
        )
        .await
        .unwrap();
        agents.push(agent);
    }
    let connections = connection_names(&ns, &["h1", "h2"]).await;

    // 16 tasks and the one with the odd header name reach p2; p1 is empty.
    eventually(Duration::from_secs(60), "17 tasks at p2", || async {
        let at_p2 = ready(&broker, &next_queue).await?.unwrap_or(0);
        anyhow::ensure!(at_p2 == 17, "{at_p2} at p2");
        Ok(())
    })
    .await;
    eventually(Duration::from_secs(30), "p1 to be empty", || async {
        let management = Management::new(&management_url(), "/")?;
        let q = management
            .queue(&stage_queue)
            .await?
            .ok_or_else(|| anyhow::anyhow!("p1 not listed"))?;
        anyhow::ensure!(
            q.messages_ready == 0 && q.messages_unacknowledged == 0,
            "p1: {} ready, {} unacked",
            q.messages_ready,
            q.messages_unacknowledged
        );
        Ok(())
    })
    .await;
    let passed = broker.drain(&next_queue).await.unwrap();
    let ids: BTreeSet<String> = passed.iter().map(|(id, _, _)| id.clone()).collect();
    let mut expected: BTreeSet<String> = (0..16).map(|i| format!("T-{i}")).collect();
    expected.insert("ODD-1".into());
    assert_eq!(ids, expected);

    // Exactly the two poisons in the dead-letter queue, with their reasons.
    eventually(Duration::from_secs(20), "two dead letters", || async {
        let n = ready(&broker, &dead_queue).await?.unwrap_or(0);
        anyhow::ensure!(n >= 2, "{n} dead letters");
        Ok(())
    })
    .await;
    let dead = broker.drain(&dead_queue).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let mut bodies = Vec::new();
    for (id, body, headers) in &dead {
        assert!(id.contains('\u{fffd}'), "the id as lapin read it: {id:?}");
        assert_eq!(
            text(headers, h::ERROR_CLASS).as_deref(),
            Some("invalid_message_id")
        );
        let error = text(headers, h::LAST_ERROR).unwrap_or_default();
        assert!(error.contains("message_id"), "{error}");
        assert_eq!(text(headers, h::DEAD_STAGE).as_deref(), Some("p1"));
        let by = text(headers, h::DEAD_BY).unwrap_or_default();
        assert!(by == "h1" || by == "h2", "{by}");
        bodies.push(body.clone());
    }
    bodies.sort();
    assert_eq!(bodies, ["\u{1}x", "fat"]);
    // The fat one lost its own header to fit a frame; the reasons stayed.
    let fat = dead.iter().find(|(_, body, _)| body == "fat").unwrap();
    assert!(!fat.2.inner().contains_key("big"));

    // Counted once each by the coordinator.
    let api = coordinator.api.clone();
    eventually(
        Duration::from_secs(20),
        "the rejections counted",
        || async {
            let m = api.metrics().await?;
            let rejected = m.value(
                "guildhall_deliveries_rejected_total",
                &[("stage", "p1"), ("reason", "invalid_message_id")],
            );
            anyhow::ensure!(rejected == Some(2.0), "{rejected:?}");
            Ok(())
        },
    )
    .await;

    // No agent lost its connection: the same connections, no reconnect in
    // the logs, and the agents' own count of lost links is 0.
    assert_eq!(connection_names(&ns, &["h1", "h2"]).await, connections);
    let mut rejected = 0;
    for mut agent in agents {
        agent.proc.terminate(Duration::from_secs(30)).await.unwrap();
        let log = agent.proc.log_text();
        assert!(!log.contains("lost the broker"), "{}:\n{log}", agent.id);
        assert!(!log.contains("reconnect"), "{}:\n{log}", agent.id);
        assert!(log.contains("links_lost=0"), "{}:\n{log}", agent.id);
        let line = log
            .lines()
            .find(|l| l.contains("rejected="))
            .unwrap_or_default();
        let n: u32 = line
            .split("rejected=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        rejected += n;
        // Logged once, with its delivery tag.
        assert_eq!(
            log.matches("a delivery that cannot be a task").count() as u32,
            n,
            "{}:\n{log}",
            agent.id
        );
        if n > 0 {
            assert!(log.contains("delivery_tag="), "{log}");
        }
    }
    assert_eq!(rejected, 2);
}

/// Issue 16, item 3: `(sleep 50 >&2 &); echo done` exits 0 at once; its
/// background child keeps stdout and stderr open for 50 s. The task
/// succeeds when the process exits, not when the pipes close (before, it
/// was reported as a timeout and retried).
#[tokio::test]
async fn an_exec_task_succeeds_when_its_process_exits_despite_a_background_child() {
    let ns = TestNs::new("hostile-exec");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("bg").await.unwrap();
    let agent = spawn_agent(
        &ns,
        "bg1",
        "bg",
        &[
            "--next",
            "after",
            "--exec",
            "(sleep 50 >&2 &); echo done",
            "--task-timeout",
            "30s",
        ],
    )
    .await
    .unwrap();
    broker.publish_task("bg", "BG-1", "x").await.unwrap();
    let after = ns.names.stage_queue(&TestNs::stage("after"));
    // Well under the task timeout: the old agent waited for the pipes.
    eventually(
        Duration::from_secs(15),
        "the result at the next stage",
        || async {
            anyhow::ensure!(ready(&broker, &after).await?.unwrap_or(0) == 1);
            Ok(())
        },
    )
    .await;
    let out = broker.drain(&after).await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0.as_str(), out[0].1.as_str()), ("BG-1", "done\n"));
    let events = broker.read_events().await.unwrap();
    let story: Vec<&str> = events
        .iter()
        .flat_map(|e| &e.events)
        .filter_map(|e| match e {
            Event::TaskSucceeded(s) if s.task_id.as_str() == "BG-1" => Some("succeeded"),
            Event::TaskFailed(f) if f.task_id.as_str() == "BG-1" => Some("failed"),
            _ => None,
        })
        .collect();
    assert_eq!(story, ["succeeded"], "{}", agent.proc.log_text());
}

/// An HTTP worker that answers each task with the `x-guildhall-next-stage`
/// given in its payload: `to:NAME`, `raw:HEX` (raw header bytes) or `big`
/// (a 10 KB value).
async fn next_stage_worker() -> String {
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    async fn work(body: axum::body::Bytes) -> axum::response::Response {
        let text = String::from_utf8_lossy(&body).into_owned();
        let value = if let Some(name) = text.strip_prefix("to:") {
            HeaderValue::from_str(name).ok()
        } else if let Some(hex) = text.strip_prefix("raw:") {
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect();
            HeaderValue::from_bytes(&bytes).ok()
        } else if text == "big" {
            HeaderValue::from_str(&"a".repeat(10 * 1024)).ok()
        } else {
            None
        };
        let mut response = (StatusCode::OK, body).into_response();
        if let Some(value) = value {
            response
                .headers_mut()
                .insert("x-guildhall-next-stage", value);
        }
        response
    }
    let app = axum::Router::new().route("/work", axum::routing::post(work));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/work", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// Issue 16, item 4: a worker naming a next stage that is neither the
/// agent's own nor declared gets its task dead-lettered at its stage with
/// class `unknown_stage`, and no queue is created; a stage the operator
/// declared is used; names that cannot be stages (bad characters, 10 KB,
/// bytes that are not UTF-8) are refused as `invalid_next_stage`. With
/// `--allow-new-stages` the named stage is declared, as before.
#[tokio::test]
async fn a_next_stage_must_exist_unless_new_stages_are_allowed() {
    let ns = TestNs::new("hostile-next");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("route").await.unwrap();
    broker.declare_stage("existing").await.unwrap();
    let worker = next_stage_worker().await;
    let mut agent = spawn_agent(
        &ns,
        "n1",
        "route",
        &[
            "--next",
            "out",
            "--worker-url",
            &worker,
            "--concurrency",
            "4",
        ],
    )
    .await
    .unwrap();
    let cases = [
        ("N-UNKNOWN", "to:nosuchstage"),
        ("N-EXISTING", "to:existing"),
        ("N-DEFAULT", "plain"),
        ("N-SLASH", "to:no/such"),
        ("N-BIG", "big"),
        ("N-BYTES", "raw:fffe6162"),
        ("N-LATIN", "raw:6eff"),
    ];
    for (id, payload) in cases {
        broker.publish_task("route", id, payload).await.unwrap();
    }
    let dead_queue = ns.names.dead_queue(&TestNs::stage("route"));
    eventually(Duration::from_secs(30), "five dead letters", || async {
        let n = ready(&broker, &dead_queue).await?.unwrap_or(0);
        anyhow::ensure!(n == 5, "{n} dead letters");
        Ok(())
    })
    .await;
    let dead = broker.drain(&dead_queue).await.unwrap();
    let class_of = |id: &str| {
        dead.iter()
            .find(|(i, _, _)| i == id)
            .and_then(|(_, _, h)| text(h, h::ERROR_CLASS))
    };
    assert_eq!(class_of("N-UNKNOWN").as_deref(), Some("unknown_stage"));
    let error = dead
        .iter()
        .find(|(i, _, _)| i == "N-UNKNOWN")
        .and_then(|(_, _, hd)| text(hd, h::LAST_ERROR))
        .unwrap_or_default();
    assert!(error.contains("\"nosuchstage\""), "{error}");
    assert!(error.contains("--allow-new-stages"), "{error}");
    for id in ["N-SLASH", "N-BIG", "N-BYTES", "N-LATIN"] {
        assert_eq!(class_of(id).as_deref(), Some("invalid_next_stage"), "{id}");
    }
    let nosuch = ns.names.stage_queue(&TestNs::stage("nosuchstage"));
    assert_eq!(
        ready(&broker, &nosuch).await.unwrap(),
        None,
        "no queue declared"
    );
    let existing = ns.names.stage_queue(&TestNs::stage("existing"));
    let out = ns.names.stage_queue(&TestNs::stage("out"));
    eventually(Duration::from_secs(20), "the other two routed", || async {
        anyhow::ensure!(ready(&broker, &existing).await? == Some(1));
        anyhow::ensure!(ready(&broker, &out).await? == Some(1));
        Ok(())
    })
    .await;
    agent.proc.terminate(Duration::from_secs(30)).await.unwrap();
    let log = agent.proc.log_text();
    assert!(log.contains("links_lost=0"), "{log}");

    // The old behaviour, on request.
    let _open = spawn_agent(
        &ns,
        "n2",
        "route",
        &[
            "--next",
            "out",
            "--worker-url",
            &worker,
            "--allow-new-stages",
        ],
    )
    .await
    .unwrap();
    broker
        .publish_task("route", "N-NEW", "to:nosuchstage")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the task at the new stage",
        || async {
            anyhow::ensure!(ready(&broker, &nosuch).await? == Some(1));
            Ok(())
        },
    )
    .await;
}

/// Issue 16, item 2: an AMQP `timestamp` of 2^62 s (its milliseconds wrap
/// in 64 bits) is no enqueue time: the agent reports none, logs it, and the
/// coordinator's stage wait stays sane.
#[tokio::test]
async fn an_overflowing_timestamp_is_no_enqueue_time() {
    let ns = TestNs::new("hostile-time");
    let coordinator = spawn_coordinator(&ns, &[]).await.unwrap();
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("ts").await.unwrap();
    let mut agent = spawn_agent(
        &ns,
        "t1",
        "ts",
        &["--simulate", "median=20ms,spread=0", "--heartbeat", "500ms"],
    )
    .await
    .unwrap();
    // As a producer outside Guildhall would: id and timestamp, no headers.
    let props = BasicProperties::default()
        .with_message_id("TS-1".into())
        .with_timestamp(1 << 62);
    broker
        .publisher
        .publish(&ns.names.tasks_exchange(), "ts", b"x", props)
        .await
        .unwrap();
    broker.publish_task("ts", "TS-2", "x").await.unwrap();
    let started = eventually(Duration::from_secs(30), "both tasks done", || async {
        let events = broker.read_events().await?;
        let all: Vec<Event> = events.into_iter().flat_map(|e| e.events).collect();
        let done = all
            .iter()
            .filter(
                |e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str().starts_with("TS-")),
            )
            .count();
        anyhow::ensure!(done == 2, "{done} done");
        Ok(all)
    })
    .await;
    let enqueued = |id: &str| {
        started.iter().find_map(|e| match e {
            Event::TaskStarted(s) if s.task_id.as_str() == id => Some(s.enqueued_at_ms),
            _ => None,
        })
    };
    assert_eq!(enqueued("TS-1"), Some(None), "2^62 s is no enqueue time");
    let sane = enqueued("TS-2").flatten().unwrap();
    assert!(sane.abs_diff(now_ms()) < 600_000);
    eventually(Duration::from_secs(20), "a sane stage wait", || async {
        let stages = coordinator.api.get_ok("/api/stages").await?;
        let stage = stages["stages"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "ts"))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no stage ts"))?;
        anyhow::ensure!(stage["succeeded"] == 2, "{stage}");
        let wait = &stage["queue_wait_ms"];
        if !wait.is_null() {
            let mean = wait["mean"].as_f64().unwrap_or(f64::MAX);
            let p99 = wait["p99"].as_u64().unwrap_or(u64::MAX);
            anyhow::ensure!(mean < 60_000.0 && p99 < 60_000, "absurd wait: {wait}");
        }
        Ok(())
    })
    .await;
    agent.proc.terminate(Duration::from_secs(30)).await.unwrap();
    let log = agent.proc.log_text();
    assert!(log.contains("implausible time"), "{log}");
    assert!(log.contains("implausible_times=1"), "{log}");
    // TaskMeta, the library the agent reads with, says the same.
    let meta = TaskMeta::from_properties(&BasicProperties::default().with_timestamp(1 << 62));
    assert_eq!(meta.unwrap().enqueued_at_ms, None);
}

/// A RabbitMQ user of its own in the default vhost, allowed only to publish
/// to the namespace's task exchange; deleted on drop.
struct ProducerUser {
    /// User name (and password).
    name: String,
    /// The management API without credentials, and the admin's.
    api: (reqwest::Url, String, String),
}

impl ProducerUser {
    async fn create(ns: &TestNs) -> Self {
        let mut api = reqwest::Url::parse(&management_url()).unwrap();
        let (user, pass) = (
            api.username().to_owned(),
            api.password().unwrap_or("").to_owned(),
        );
        api.set_username("").unwrap();
        api.set_password(None).unwrap();
        let me = Self {
            name: format!("{}-producer", ns.name()),
            api: (api, user, pass),
        };
        let tasks = regex_escape(&ns.names.tasks_exchange());
        for (path, body) in [
            (
                format!("api/users/{}", me.name),
                serde_json::json!({ "password": me.name, "tags": "" }),
            ),
            (
                format!("api/permissions/%2F/{}", me.name),
                serde_json::json!({ "configure": "^$", "write": format!("^{tasks}$"), "read": "^$" }),
            ),
        ] {
            let status = me
                .request(reqwest::Method::PUT, &path)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status();
            assert!(status.is_success(), "PUT {path}: {status}");
        }
        me
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let (base, user, pass) = &self.api;
        reqwest::Client::new()
            .request(method, format!("{}{path}", base.as_str()))
            .basic_auth(user, Some(pass))
    }

    /// An AMQP URL as this user.
    fn amqp_url(&self) -> String {
        let mut url = reqwest::Url::parse(&amqp_url()).unwrap();
        url.set_username(&self.name).unwrap();
        url.set_password(Some(&self.name)).unwrap();
        url.to_string()
    }
}

impl Drop for ProducerUser {
    fn drop(&mut self) {
        let request = self.request(reqwest::Method::DELETE, &format!("api/users/{}", self.name));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().ok()?;
            rt.block_on(request.send()).ok()
        })
        .join();
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '.' | '-' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

/// A producer of another RabbitMQ user sets `user_id` (the broker checks it
/// against its own user). Dead-lettering such a task with that `user_id`
/// would make the broker close the agent's channel (it is not the agent's
/// user), lose the link and loop: the dead letter goes without it, and the
/// connection stays.
#[tokio::test]
async fn a_producers_user_id_on_a_task_costs_the_agent_no_connection() {
    let ns = TestNs::new("hostile-user");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("u1").await.unwrap();
    let producer = ProducerUser::create(&ns).await;
    let mut agent = spawn_agent(
        &ns,
        "u1a",
        "u1",
        &["--exec", "cat >/dev/null; echo 'bad input' >&2; exit 65"],
    )
    .await
    .unwrap();
    let url = guildhall_broker::AmqpUrl::parse(&producer.amqp_url()).unwrap();
    let conn = guildhall_broker::connect(&url, "hostile-producer")
        .await
        .unwrap();
    let publisher = guildhall_broker::Publisher::open(&conn).await.unwrap();
    for id in ["U-1", "not a task id"] {
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_user_id(producer.name.as_str().into());
        publisher
            .publish(&ns.names.tasks_exchange(), "u1", b"x", props)
            .await
            .unwrap();
    }
    let dead_queue = ns.names.dead_queue(&TestNs::stage("u1"));
    eventually(Duration::from_secs(30), "two dead letters", || async {
        let n = ready(&broker, &dead_queue).await?.unwrap_or(0);
        anyhow::ensure!(n == 2, "{n} dead letters");
        Ok(())
    })
    .await;
    let dead = broker.drain(&dead_queue).await.unwrap();
    let mut classes: Vec<_> = dead
        .iter()
        .map(|(id, _, hd)| (id.clone(), text(hd, h::ERROR_CLASS).unwrap_or_default()))
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            ("U-1".to_owned(), "exit_65".to_owned()),
            ("not a task id".to_owned(), "invalid_message_id".to_owned())
        ]
    );
    agent.proc.terminate(Duration::from_secs(30)).await.unwrap();
    let log = agent.proc.log_text();
    assert!(!log.contains("lost the broker"), "{log}");
    assert!(log.contains("links_lost=0"), "{log}");
    let _ = conn.close(200, "done".into()).await;
}
