//! `deploy/rabbitmq/definitions.json` on the real broker: the real binaries
//! run as its `coordinator`, `agent` and `producer` users, and what each user
//! must not do is refused by the broker.
//!
//! Each test imports the definitions into a virtual host of its own
//! (`gh-defs-<hex>`), with every user name prefixed by the same random tag and
//! the passwords kept (each demo password is the original user name), through
//! the management API as the tests' admin user. It never touches the `/` vhost
//! or the real users, and [`Deployment`]'s drop deletes the vhost and the
//! users whether the test passed or not. Inside the vhost the namespace is
//! `guildhall`, as in production: the vhost is the isolation.

use anyhow::{Context, bail, ensure};
use guildhall_broker::{AmqpUrl, Management, connect};
use guildhall_tests::*;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use std::future::Future;
use std::time::Duration;

/// The file under test, as deployed.
const DEFINITIONS: &str = include_str!("../../deploy/rabbitmq/definitions.json");

/// The namespace inside the test's vhost: the production one.
const NS: &str = "guildhall";

/// The users the definitions must have (each one's password is its name).
const USERS: [&str; 4] = ["admin", "coordinator", "agent", "producer"];

/// RabbitMQ's ACCESS_REFUSED: a permission (or topic permission) said no.
const ACCESS_REFUSED: u16 = 403;

/// RabbitMQ's RESOURCE_LOCKED: an exclusive queue used from another connection.
const RESOURCE_LOCKED: u16 = 405;

/// The management API as the tests' administrator (`management_url()`):
/// the broker crate's client, for the calls it has no method of its own for.
#[derive(Clone)]
struct Admin(Management);

/// Longest one admin call may take (an import is slower than a read).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Admin {
    fn new() -> anyhow::Result<Self> {
        Ok(Self(Management::new(&management_url(), "/")?))
    }

    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.0.request(method, segments).timeout(ADMIN_TIMEOUT)
    }

    async fn get(&self, segments: &[&str]) -> anyhow::Result<(u16, Value)> {
        let r = self.request(Method::GET, segments).send().await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn post_definitions(&self, definitions: &Value) -> anyhow::Result<()> {
        let r = self
            .request(Method::POST, &["definitions"])
            .json(definitions)
            .send()
            .await?;
        let status = r.status();
        if !status.is_success() {
            bail!(
                "POST /api/definitions: {status} {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// DELETE; a 404 (already gone, or never created) is fine.
    async fn delete(&self, segments: &[&str]) -> anyhow::Result<()> {
        let status = self
            .request(Method::DELETE, segments)
            .send()
            .await?
            .status();
        ensure!(
            status.is_success() || status.as_u16() == 404,
            "DELETE {segments:?}: {status}"
        );
        Ok(())
    }
}

/// The definitions imported into a vhost and users of their own; both are
/// deleted on drop.
struct Deployment {
    /// Prefix of every user name (`ghd<hex>`).
    tag: String,
    /// The vhost (`gh-defs-<hex>`).
    vhost: String,
    /// Admin access for the import, checks and clean-up.
    admin: Admin,
    /// Users the test added (one per agent, for the strong mode), deleted
    /// with the others.
    extra_users: std::sync::Mutex<Vec<String>>,
}

impl Deployment {
    /// Imports deploy/rabbitmq/definitions.json into a fresh vhost.
    async fn import() -> anyhow::Result<Self> {
        let hex = format!("{:08x}", rand::random::<u32>());
        // The guard exists before anything is created, so a failed import is
        // cleaned up too.
        let deployment = Self {
            tag: format!("ghd{hex}"),
            vhost: format!("gh-defs-{hex}"),
            admin: Admin::new()?,
            extra_users: std::sync::Mutex::new(Vec::new()),
        };
        let original: Value = serde_json::from_str(DEFINITIONS)?;
        let rewritten = rewrite(&original, &deployment.vhost, &deployment.tag)?;
        deployment.admin.post_definitions(&rewritten).await?;
        Ok(deployment)
    }

    /// The test's name for one of the definitions' users.
    fn user(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// An AMQP URL into the vhost as `user` (whose password is its name).
    fn amqp_url(&self, user: &str) -> String {
        let mut url = Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        url.set_username(&self.user(user)).expect("AMQP URL host");
        url.set_password(Some(user)).expect("AMQP URL host");
        url.set_path(&format!("/{}", self.vhost));
        url.to_string()
    }

    /// The management URL as `user`.
    fn management_url(&self, user: &str) -> String {
        let mut url = Url::parse(&self.admin.0.url()).expect("management URL");
        url.set_username(&self.user(user))
            .expect("management URL host");
        url.set_password(Some(user)).expect("management URL host");
        url.to_string().trim_end_matches('/').to_owned()
    }

    /// An AMQP connection as `user`, named `name`.
    async fn connect(&self, user: &str, name: &str) -> anyhow::Result<Connection> {
        let url = AmqpUrl::parse(&self.amqp_url(user))?;
        Ok(connect(&url, name).await?)
    }

    /// Adds a broker user of its own for agent `id` (named `id`, password
    /// `id`, the definitions' `agent` permissions), as the strong mode
    /// wants: one user per agent. Returns its AMQP URL into the vhost.
    async fn add_agent_user(&self, id: &str) -> anyhow::Result<String> {
        self.extra_users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_owned());
        let definitions: Value = serde_json::from_str(DEFINITIONS)?;
        let perms = definitions["permissions"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["user"] == "agent"))
            .context("the agent's permissions")?
            .clone();
        for (segments, body) in [
            (vec!["users", id], json!({ "password": id, "tags": "" })),
            (
                vec!["permissions", self.vhost.as_str(), id],
                json!({
                    "configure": perms["configure"],
                    "write": perms["write"],
                    "read": perms["read"],
                }),
            ),
        ] {
            let r = self
                .admin
                .request(Method::PUT, &segments)
                .json(&body)
                .send()
                .await?;
            ensure!(r.status().is_success(), "PUT {segments:?}: {}", r.status());
        }
        let mut url = Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        url.set_username(id).expect("AMQP URL host");
        url.set_password(Some(id)).expect("AMQP URL host");
        url.set_path(&format!("/{}", self.vhost));
        Ok(url.to_string())
    }

    /// A queue of the vhost as the management API shows it (`None`: absent).
    async fn queue(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let (status, body) = self.admin.get(&["queues", &self.vhost, name]).await?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            s => bail!("GET queue {name}: {s} {body}"),
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let vhost = self.vhost.clone();
        let mut users: Vec<String> = USERS.iter().map(|u| self.user(u)).collect();
        users.extend(
            self.extra_users
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        // Drop is synchronous: run the clean-up on a runtime of its own.
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                // Queues one by one, then the vhost: deleting a vhost that
                // still holds quorum queues with at-least-once dead-lettering
                // (the bands, the delay ladder) can crash their DLX workers
                // in RabbitMQ 3.10 faster than `rabbit_fifo_dlx_sup` allows,
                // which then refuses every such queue broker-wide until the
                // app restarts (rabbitmq-server #16652).
                let mut first_error = None;
                match admin.get(&["queues", &vhost]).await {
                    Ok((200, Value::Array(queues))) => {
                        for q in queues.iter().filter_map(|q| q["name"].as_str()) {
                            if let Err(e) = admin.delete(&["queues", &vhost, q]).await {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
                if let Err(e) = admin.delete(&["vhosts", &vhost]).await {
                    first_error.get_or_insert(e);
                }
                for user in &users {
                    if let Err(e) = admin.delete(&["users", user]).await {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
        })
        .join();
        if !matches!(result, Ok(Ok(()))) {
            eprintln!(
                "warning: could not clean up vhost {} and users {}-*",
                self.vhost, self.tag
            );
        }
    }
}

/// The objects in the array `key` of the definitions.
fn entries<'a>(
    top: &'a mut serde_json::Map<String, Value>,
    key: &str,
) -> Vec<&'a mut serde_json::Map<String, Value>> {
    top.get_mut(key)
        .and_then(Value::as_array_mut)
        .map(|a| a.iter_mut().filter_map(Value::as_object_mut).collect())
        .unwrap_or_default()
}

/// The definitions moved into `vhost`, every user renamed `<tag>-<name>`.
fn rewrite(definitions: &Value, vhost: &str, tag: &str) -> anyhow::Result<Value> {
    let mut d = definitions.clone();
    let top = d
        .as_object_mut()
        .context("definitions: not a JSON object")?;
    for user in entries(top, "users") {
        let name = user["name"].as_str().context("user without a name")?;
        user.insert("name".into(), json!(format!("{tag}-{name}")));
    }
    for key in ["permissions", "topic_permissions"] {
        for p in entries(top, key) {
            let user = p["user"].as_str().context("permission without a user")?;
            p.insert("user".into(), json!(format!("{tag}-{user}")));
            p.insert("vhost".into(), json!(vhost));
        }
    }
    for key in ["policies", "queues", "exchanges", "bindings"] {
        for item in entries(top, key) {
            item.insert("vhost".into(), json!(vhost));
        }
    }
    top.insert("vhosts".into(), json!([{ "name": vhost }]));
    Ok(d)
}

/// The broker's reply code and text for an operation that must be refused.
fn refusal<T>(what: &str, result: Result<T, lapin::Error>) -> (u16, String) {
    match result {
        Ok(_) => panic!("{what}: allowed, but the definitions must refuse it"),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => (p.get_id(), p.get_message().to_string()),
            _ => panic!("{what}: failed with {e}, not a refusal by the broker"),
        },
    }
}

/// Asserts that `result` is the broker refusing with `code`.
fn assert_refused<T>(what: &str, code: u16, result: Result<T, lapin::Error>) {
    let (got, message) = refusal(what, result);
    assert_eq!(got, code, "{what}: {message}");
}

/// Runs `op` on a fresh channel of `conn` (a refusal closes the channel).
async fn on_channel<T, F, Fut>(conn: &Connection, op: F) -> Result<T, lapin::Error>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<T, lapin::Error>>,
{
    let channel = conn.create_channel().await?;
    op(channel).await
}

/// Publishes one message with a publisher confirm: a refused publish closes
/// the channel, which fails the confirm with the broker's error.
async fn publish_confirmed(
    channel: Channel,
    exchange: &str,
    key: &str,
) -> Result<Confirmation, lapin::Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"not a real message",
            BasicProperties::default(),
        )
        .await?
        .await
}

async fn consume(channel: Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    // Streams need a prefetch; the others do not mind one.
    channel.basic_qos(10, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let args = if queue.ends_with(".events") {
        args
    } else {
        FieldTable::default()
    };
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
}

async fn wait_status(api: &Api, id: &str, want: &str) {
    eventually(Duration::from_secs(20), &format!("{id} {want}"), || async {
        let w = api.get_ok(&format!("/api/workers/{id}")).await?;
        ensure!(w["status"] == want, "{}", w["status"]);
        Ok(())
    })
    .await;
}

async fn wait_succeeded(api: &Api, id: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        &format!("{id} succeeded"),
        || async {
            let t = api.get_ok(&format!("/api/tasks/{id}")).await?;
            ensure!(t["status"] == "succeeded", "{t}");
            Ok(t)
        },
    )
    .await
}

fn stages_of(task: &Value) -> Vec<(String, String)> {
    task["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["stage"].as_str().unwrap_or_default().to_owned(),
                        x["outcome"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_definitions_cover_one_vhost_and_only_guildhall_names() {
    let d: Value = serde_json::from_str(DEFINITIONS).expect("definitions.json is JSON");
    let names: Vec<&str> = d["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, USERS);
    assert_eq!(d["vhosts"], json!([{ "name": "/" }]));
    for key in ["permissions", "topic_permissions", "policies", "queues"] {
        for item in d[key].as_array().expect(key) {
            assert_eq!(item["vhost"], "/", "{key}: {item}");
        }
    }
    for p in d["permissions"].as_array().expect("permissions") {
        if p["user"] == "admin" {
            continue;
        }
        for verb in ["configure", "write", "read"] {
            let re = p[verb].as_str().expect("a regex");
            assert!(
                re.starts_with('^') && re.ends_with('$'),
                "{}'s {verb} regex must be anchored: {re}",
                p["user"]
            );
        }
    }
    for q in d["queues"].as_array().expect("queues") {
        assert!(
            q["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("guildhall."))
        );
    }
    for p in d["policies"].as_array().expect("policies") {
        assert!(
            p["pattern"]
                .as_str()
                .is_some_and(|n| n.starts_with("^guildhall\\.")),
            "{p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_flow_and_commands_reach_agents_as_the_deployment_users() {
    let ns = TestNs::new("defs-flow");
    let d = Deployment::import().await.unwrap();
    let coordinator_url = d.amqp_url("coordinator");
    let coordinator_management = d.management_url("coordinator");
    let c = spawn_coordinator(
        &ns,
        &[
            "--namespace",
            NS,
            "--amqp-url",
            &coordinator_url,
            "--management-url",
            &coordinator_management,
            "--queue-poll",
            "200ms",
        ],
    )
    .await
    .unwrap();
    // The coordinator user can use the management API (checked at start).
    let (_, health) = c.api.get("/healthz").await.unwrap();
    assert_eq!(health["management_api"], true, "{health}");

    // Agent ids unique to this run (the coordinator only looks agents'
    // connections up in its own vhost, but other tests share "/").
    let intake_id = format!("{}-intake", d.tag);
    let build_id = format!("{}-build", d.tag);
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let agent_url = d.amqp_url("agent");
    let coordinator_user = d.user("coordinator");
    let common = [
        "--namespace",
        NS,
        "--amqp-url",
        agent_url.as_str(),
        "--command-user",
        coordinator_user.as_str(),
        "--worker-url",
        worker.url.as_str(),
        "--heartbeat",
        "500ms",
        "--retry-delay",
        "200ms",
    ];
    let mut args = common.to_vec();
    args.extend(["--next", "build"]);
    let intake = spawn_agent(&ns, &intake_id, "intake", &args).await.unwrap();
    let build = spawn_agent(&ns, &build_id, "build", &common).await.unwrap();
    wait_status(&c.api, &intake_id, "idle").await;
    wait_status(&c.api, &build_id, "idle").await;

    // The producer: a stage nobody declared yet is refused (creating a stage
    // queue needs read on it, which the producer has not); an existing one
    // may be declared again, and tasks go in.
    let producer_url = d.amqp_url("producer");
    let submit = ["submit", "--namespace", NS, "--amqp-url", &producer_url];
    let mut args = submit.to_vec();
    args.extend(["--stage", "brand-new", "--declare", "--payload", "x"]);
    let o = run_guildhall(&args).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("ACCESS_REFUSED"), "{err}");
    assert!(
        err.contains("guildhall.stage.brand-new"),
        "the refusal names the stage queue: {err}"
    );
    for (id, payload, declare) in [
        ("DEF-1", "plain", true),
        ("DEF-2", "intake:fail=once", false),
        ("DEF-3", "build:fail=permanent-first", false),
    ] {
        let mut args = submit.to_vec();
        args.extend(["--stage", "intake", "--id", id, "--payload", payload]);
        if declare {
            args.push("--declare");
        }
        let o = run_guildhall(&args).await;
        assert!(
            o.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // Through both stages; DEF-2 through a retry queue (declared by the agent
    // user, with the task exchange as its dead-letter exchange).
    let t = wait_succeeded(&c.api, "DEF-1").await;
    let stages = stages_of(&t);
    assert!(
        stages.contains(&("intake".into(), "succeeded".into()))
            && stages.contains(&("build".into(), "succeeded".into())),
        "{t}"
    );
    let t = wait_succeeded(&c.api, "DEF-2").await;
    let intake_attempts = stages_of(&t).iter().filter(|(s, _)| s == "intake").count();
    assert!(intake_attempts >= 2, "a retried attempt at intake: {t}");
    // DEF-3: dead-lettered at build by the agent user, listed and replayed by
    // the coordinator user (read on the dead-letter queue, write on the task
    // exchange), then done.
    let listing = eventually(Duration::from_secs(20), "DEF-3 dead-lettered", || async {
        let l = c.api.get_ok("/api/dead/build").await?;
        ensure!(l["count"] == 1, "{l}");
        Ok(l)
    })
    .await;
    assert_eq!(listing["tasks"][0]["id"], "DEF-3", "{listing}");
    let (status, r) = c
        .api
        .post_raw("/api/dead/build/replay", r#"{"all": true}"#)
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    wait_succeeded(&c.api, "DEF-3").await;

    // Commands: the coordinator user publishes on the control exchange, the
    // agent answers through direct reply-to (the default exchange).
    let (status, body) = c
        .api
        .post_raw(&format!("/api/workers/{build_id}/pause"), "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_status(&c.api, &build_id, "paused").await;
    let (status, body) = c
        .api
        .post_raw(&format!("/api/workers/{build_id}/resume"), "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_status(&c.api, &build_id, "idle").await;

    // A forged command: the agent user may publish to the default exchange
    // (events, replies, retries), so it can put a message straight into
    // another agent's command queue. The broker refuses a `user_id` that is
    // not the publisher's own, and the agent (`--command-user`) obeys only
    // the coordinator's user, so the forgery is dropped.
    let forger = d.connect("agent", "forger").await.unwrap();
    let pause = guildhall_proto::command::encode(&guildhall_proto::CommandMessage {
        id: 7,
        sent_at_ms: guildhall_broker::now_ms(),
        command: guildhall_proto::Command::Pause,
    })
    .unwrap();
    let build_queue = format!("{NS}.agent.{build_id}");
    let forge = |user_id: Option<String>| {
        let pause = pause.clone();
        let build_queue = build_queue.clone();
        let forger = &forger;
        async move {
            on_channel(forger, |ch| async move {
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                let mut props = BasicProperties::default();
                if let Some(user) = user_id {
                    props = props.with_user_id(user.as_str().into());
                }
                ch.basic_publish(
                    "".into(),
                    build_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &pause,
                    props,
                )
                .await?
                .await
            })
            .await
        }
    };
    // Posing as the coordinator: refused by the broker (406).
    assert_refused(
        "the agent user publishing as the coordinator user",
        406,
        forge(Some(coordinator_user.clone())).await,
    );
    // As itself, or with no user_id: delivered, and dropped by the agent.
    forge(None).await.unwrap();
    forge(Some(d.user("agent"))).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the agent drops both forgeries",
        || async {
            let dropped = build
                .proc
                .log_text()
                .matches("dropping a command not sent by the coordinator's user")
                .count();
            ensure!(dropped == 2, "{dropped} dropped so far");
            Ok(())
        },
    )
    .await;
    let view = c
        .api
        .get_ok(&format!("/api/workers/{build_id}"))
        .await
        .unwrap();
    assert_eq!(view["status"], "idle", "a forged pause was obeyed: {view}");
    let _ = forger.close(200, "done".into()).await;

    // A frozen agent: declared dead, and its connection closed through the
    // management API, which the coordinator may do with its administrator tag.
    intake.proc.signal("STOP");
    wait_status(&c.api, &intake_id, "dead").await;
    eventually(
        Duration::from_secs(20),
        "the frozen agent's connection closed",
        || async {
            let m = c.api.metrics().await?;
            let closed = m
                .value(
                    "guildhall_connections_closed_total",
                    &[("outcome", "closed")],
                )
                .unwrap_or(0.0);
            ensure!(closed >= 1.0, "closed: {closed}");
            Ok(())
        },
    )
    .await;
    intake.proc.signal("KILL");
    drop(build);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_is_refused_what_it_must_not_do() {
    let ns = TestNs::new("defs-deny");
    let d = Deployment::import().await.unwrap();

    // The events stream comes with the vhost, under the retention policy
    // (the management API shows the policy after its next stats refresh).
    eventually(
        Duration::from_secs(20),
        "the events stream under its policy",
        || async {
            let events = d.queue("guildhall.events").await?.context("no stream")?;
            ensure!(events["type"] == "stream", "{events}");
            ensure!(events["policy"] == "guildhall-events-retention", "{events}");
            ensure!(
                events["effective_policy_definition"]["max-age"] == "7D",
                "{events}"
            );
            Ok(())
        },
    )
    .await;

    // A real agent holds its command queue.
    let victim = format!("{}-victim", d.tag);
    let victim_queue = format!("guildhall.agent.{victim}");
    let agent_url = d.amqp_url("agent");
    let _agent = spawn_agent(
        &ns,
        &victim,
        "intake",
        &[
            "--namespace",
            NS,
            "--amqp-url",
            &agent_url,
            "--simulate",
            "median=5ms",
        ],
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "the agent's command queue",
        || async {
            d.queue(&victim_queue)
                .await?
                .map(|_| ())
                .context("not declared yet")
        },
    )
    .await;

    // Another agent, same `agent` user.
    let intruder_id = format!("{}-intruder", d.tag);
    let agent = d
        .connect("agent", &format!("guildhall-agent/{NS}/{intruder_id}"))
        .await
        .unwrap();
    let allowed = on_channel(&agent, |ch| {
        publish_confirmed(ch, "guildhall.tasks", "nowhere")
    })
    .await
    .expect("the agent user publishes tasks");
    assert!(matches!(allowed, Confirmation::Ack(_)), "{allowed:?}");
    assert_refused(
        "agent publishes on the control exchange",
        ACCESS_REFUSED,
        on_channel(&agent, |ch| {
            let key = format!("agent.{victim}");
            async move { publish_confirmed(ch, "guildhall.control", &key).await }
        })
        .await,
    );
    // Nothing in the permissions keeps one agent from another's queue (one
    // regex for every agent): its exclusivity does.
    assert_refused(
        "agent consumes another agent's command queue",
        RESOURCE_LOCKED,
        on_channel(&agent, |ch| {
            let q = victim_queue.clone();
            async move { consume(ch, &q).await }
        })
        .await,
    );
    assert_refused(
        "agent deletes another agent's command queue",
        RESOURCE_LOCKED,
        on_channel(&agent, |ch| {
            let q = victim_queue.clone();
            async move {
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
            }
        })
        .await,
    );
    // Its own command queue binds to its own keys, not to every command.
    let own_queue = format!("guildhall.agent.{intruder_id}");
    let own = agent.create_channel().await.unwrap();
    own.queue_declare(
        own_queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("an agent declares its own command queue");
    own.queue_bind(
        own_queue.as_str().into(),
        "guildhall.control".into(),
        format!("agent.{intruder_id}").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("an agent binds its own key");
    assert_refused(
        "agent binds its queue to every command (#)",
        ACCESS_REFUSED,
        own.queue_bind(
            own_queue.as_str().into(),
            "guildhall.control".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    let stream_args = || {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("stream")),
        );
        args
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    assert_refused(
        "agent declares the events stream",
        ACCESS_REFUSED,
        on_channel(&agent, |ch| async move {
            ch.queue_declare("guildhall.events".into(), durable, stream_args())
                .await
        })
        .await,
    );
    assert_refused(
        "agent deletes the events stream",
        ACCESS_REFUSED,
        on_channel(&agent, |ch| async move {
            ch.queue_delete("guildhall.events".into(), QueueDeleteOptions::default())
                .await
        })
        .await,
    );
    assert_refused(
        "agent reads the events stream",
        ACCESS_REFUSED,
        on_channel(
            &agent,
            |ch| async move { consume(ch, "guildhall.events").await },
        )
        .await,
    );
    assert_refused(
        "agent reads a dead-letter queue",
        ACCESS_REFUSED,
        on_channel(&agent, |ch| async move {
            ch.basic_get("guildhall.dead.intake".into(), BasicGetOptions::default())
                .await
        })
        .await,
    );
    assert_refused(
        "agent declares a queue outside the namespace",
        ACCESS_REFUSED,
        on_channel(&agent, |ch| async move {
            ch.queue_declare("elsewhere".into(), durable, FieldTable::default())
                .await
        })
        .await,
    );

    // The producer: publishes tasks, reads nothing.
    let producer = d
        .connect("producer", "guildhall-submit/test")
        .await
        .unwrap();
    let allowed = on_channel(&producer, |ch| {
        publish_confirmed(ch, "guildhall.tasks", "nowhere")
    })
    .await
    .expect("the producer user publishes tasks");
    assert!(matches!(allowed, Confirmation::Ack(_)), "{allowed:?}");
    assert_refused(
        "producer consumes a stage queue",
        ACCESS_REFUSED,
        on_channel(&producer, |ch| async move {
            consume(ch, "guildhall.stage.intake").await
        })
        .await,
    );
    assert_refused(
        "producer gets from a stage queue",
        ACCESS_REFUSED,
        on_channel(&producer, |ch| async move {
            ch.basic_get("guildhall.stage.intake".into(), BasicGetOptions::default())
                .await
        })
        .await,
    );
    assert_refused(
        "producer publishes on the control exchange",
        ACCESS_REFUSED,
        on_channel(&producer, |ch| {
            publish_confirmed(ch, "guildhall.control", "all")
        })
        .await,
    );
    assert_refused(
        "producer consumes an agent's command queue",
        ACCESS_REFUSED,
        on_channel(&producer, |ch| {
            let q = victim_queue.clone();
            async move { consume(ch, &q).await }
        })
        .await,
    );

    // The coordinator is not on the task path.
    let coordinator = d
        .connect("coordinator", "guildhall-coordinator/test")
        .await
        .unwrap();
    assert_refused(
        "coordinator consumes a stage queue",
        ACCESS_REFUSED,
        on_channel(&coordinator, |ch| async move {
            consume(ch, "guildhall.stage.intake").await
        })
        .await,
    );
    let _ = agent.close(200, "done".into()).await;
    let _ = producer.close(200, "done".into()).await;
    let _ = coordinator.close(200, "done".into()).await;
}

/// Publishes raw bytes to the events stream on `conn`, with `user_id`.
async fn publish_event(
    conn: &Connection,
    bytes: &[u8],
    user_id: Option<&str>,
) -> Result<Confirmation, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut props = BasicProperties::default();
    if let Some(user) = user_id {
        props = props.with_user_id(user.into());
    }
    channel
        .basic_publish(
            "".into(),
            "guildhall.events".into(),
            BasicPublishOptions::default(),
            bytes,
            props,
        )
        .await?
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_user_per_agent_only_an_agents_own_user_speaks_for_it() {
    let ns = TestNs::new("defs-strong");
    let d = Deployment::import().await.unwrap();
    let producer = d.user("producer");
    let c = spawn_coordinator(
        &ns,
        &[
            "--namespace",
            NS,
            "--amqp-url",
            &d.amqp_url("coordinator"),
            "--management-url",
            &d.management_url("coordinator"),
            "--require-user-id",
            "--trusted-users",
            &producer,
        ],
    )
    .await
    .unwrap();
    // The strong mode's deployment: the agent logs in as a user of its own,
    // named as the agent.
    let id = format!("{}-a1", d.tag);
    let url = d.add_agent_user(&id).await.unwrap();
    let coordinator_user = d.user("coordinator");
    let _agent = spawn_agent(
        &ns,
        &id,
        "strong",
        &[
            "--namespace",
            NS,
            "--amqp-url",
            &url,
            "--command-user",
            &coordinator_user,
            "--simulate",
            "median=5ms",
            "--heartbeat",
            "500ms",
        ],
    )
    .await
    .unwrap();
    wait_status(&c.api, &id, "idle").await;
    // A trusted producer's events are taken (TaskSubmitted under its own
    // sender id).
    let o = run_guildhall(&[
        "submit",
        "--namespace",
        NS,
        "--amqp-url",
        &d.amqp_url("producer"),
        "--stage",
        "strong",
        "--id",
        "STRONG-1",
        "--payload",
        "x",
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_succeeded(&c.api, "STRONG-1").await;

    // Another agent's credentials (the shared `agent` user) forging a stop
    // for it: with that user's id, or none, it is dropped as forged.
    let forged = guildhall_proto::Envelope {
        sender: id.parse().unwrap(),
        incarnation: 0xbad,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![guildhall_proto::Event::AgentStopping(
            guildhall_proto::AgentStopping {
                at_ms: guildhall_broker::now_ms(),
                reason: "forged".into(),
            },
        )],
    }
    .encode()
    .unwrap();
    let intruder = d.connect("agent", "guildhall-test/intruder").await.unwrap();
    let agent_user = d.user("agent");
    publish_event(&intruder, &forged, Some(&agent_user))
        .await
        .unwrap();
    publish_event(&intruder, &forged, None).await.unwrap();
    // Claiming to be the agent's user is refused by the broker itself.
    let claimed = publish_event(&intruder, &forged, Some(&id)).await;
    let (code, text) = refusal("user_id of another user", claimed);
    assert_eq!(code, 406, "{text}");
    eventually(
        Duration::from_secs(10),
        "two forged messages counted",
        || async {
            let m = c.api.metrics().await?;
            let forged = m.value("guildhall_events_malformed_total", &[("reason", "forged")]);
            ensure!(forged == Some(2.0), "{forged:?}");
            Ok(())
        },
    )
    .await;
    // The agent was never stopped, and its own events keep coming.
    for _ in 0..8 {
        let w = c.api.get_ok(&format!("/api/workers/{id}")).await.unwrap();
        assert_eq!(w["status"], "idle", "{w}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
