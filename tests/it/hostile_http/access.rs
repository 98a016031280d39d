//! Readers without the token: worker-written text withheld (payload
//! previews, error messages and samples, attempt errors, the same in the
//! event stream), statuses and metrics still open; `access_token` decoded
//! and accepted on every read.

use super::*;

const TOKEN: &str = "reader-token-0123456789";
const CARD: &str = "4111-1111-1111-1111";

/// The first `errors` event of an event stream at `url`.
async fn first_errors_event(url: &str) -> Value {
    let mut resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = String::new();
    let read = async {
        loop {
            let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if event.contains("event: errors") {
                    let data = event
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .unwrap_or("null");
                    return serde_json::from_str(data).unwrap();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an errors event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_written_text_is_withheld_from_readers_without_the_token() {
    let ns = TestNs::new("hh-redact");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "r1",
        "work",
        &["--heartbeat", "500ms", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    let payload = format!("fail=permanent say=card={CARD}");
    broker.publish_task("work", "R-1", &payload).await.unwrap();
    let api = c.api.with_token(TOKEN);
    let open = &c.api;
    eventually(Duration::from_secs(30), "R-1 dead-lettered", || async {
        let t = api.get_ok("/api/tasks/R-1").await?;
        anyhow::ensure!(t["status"] == "dead_lettered", "{}", t["status"]);
        Ok(())
    })
    .await;

    // With the token: everything.
    let errors = api.get_ok("/api/errors").await.unwrap();
    assert!(errors.to_string().contains(CARD), "{errors}");
    let task = api.get_ok("/api/tasks/R-1").await.unwrap();
    assert!(task.to_string().contains(CARD), "{task}");
    let dead = api.get_ok("/api/dead/work").await.unwrap();
    assert!(
        dead["tasks"][0]["payload_preview"]
            .as_str()
            .unwrap()
            .contains(CARD)
    );

    // Without: the text is withheld, and says so; the rest is there.
    let errors = open.get_ok("/api/errors").await.unwrap();
    assert!(!errors.to_string().contains(CARD), "{errors}");
    let sample = &errors["classes"][0]["samples"][0];
    assert_eq!(sample["message"], Value::Null, "{sample}");
    assert_eq!(sample["redacted"], true);
    assert_eq!(sample["task_id"], "R-1");
    assert_eq!(errors["classes"][0]["count"], 1);
    let task = open.get_ok("/api/tasks/R-1").await.unwrap();
    assert!(!task.to_string().contains(CARD), "{task}");
    let attempt = &task["attempts"][0];
    assert_eq!(
        (&attempt["error"], &attempt["redacted"]),
        (&Value::Null, &Value::Bool(true))
    );
    assert_eq!(attempt["outcome"], "dead_lettered");
    let dead = open.get_ok("/api/dead/work").await.unwrap();
    assert!(!dead.to_string().contains(CARD), "{dead}");
    let row = &dead["tasks"][0];
    assert_eq!(row["payload_preview"], Value::Null);
    assert_eq!(row["redacted"], true);
    assert_eq!(row["id"], "R-1");
    assert!(row["payload_bytes"].as_u64().unwrap() > 0);
    // A wrong token is no token.
    let wrong = open.with_token("wrong-token-0123456789");
    assert!(
        !wrong
            .get_ok("/api/errors")
            .await
            .unwrap()
            .to_string()
            .contains(CARD)
    );
    // Statuses and metrics stay open.
    open.get_ok("/api/workers").await.unwrap();
    open.get_ok("/api/stages").await.unwrap();
    assert!(
        open.metrics()
            .await
            .unwrap()
            .value("guildhall_workers", &[])
            .is_some()
    );

    // The event stream likewise, the token in its query.
    let base = format!("{}/api/events", c.api.base);
    let hidden = first_errors_event(&base).await;
    assert!(!hidden.to_string().contains(CARD), "{hidden}");
    assert_eq!(hidden["classes"][0]["samples"][0]["redacted"], true);
    let shown = first_errors_event(&format!("{base}?access_token={TOKEN}")).await;
    assert!(shown.to_string().contains(CARD), "{shown}");

    // Without --api-token there is nothing to protect: all shown.
    let untokened = spawn_coordinator(&ns, &[]).await.unwrap();
    let errors = eventually(Duration::from_secs(20), "the errors replayed", || async {
        let v = untokened.api.get_ok("/api/errors").await?;
        anyhow::ensure!(v["classes"][0]["count"] == 1, "{v}");
        Ok(v)
    })
    .await;
    assert!(errors.to_string().contains(CARD), "{errors}");
    assert_eq!(errors["classes"][0]["samples"][0].get("redacted"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_is_form_decoded_on_every_read() {
    let ns = TestNs::new("hh-token");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    // Every character that needs escaping in a query: / + = % & ? #
    let token = "a/b+c=d%e&f?g#h-0123456789";
    let c = spawn_coordinator(&ns, &["--api-token", token, "--protect-reads"])
        .await
        .unwrap();
    // As `encodeURIComponent` (the dashboard) writes it; `+` for a space
    // would be a different token.
    let encoded = "a%2Fb%2Bc%3Dd%25e%26f%3Fg%23h-0123456789";
    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{}{path}", c.api.base);
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    for path in [
        "/api/workers",
        "/api/stages",
        "/api/scaling",
        "/api/errors",
        "/metrics",
        "/api/tasks",
        "/api/dead/work",
    ] {
        assert_eq!(
            get(format!("{path}?access_token={encoded}")).await,
            200,
            "{path}"
        );
        assert_eq!(get(path.to_owned()).await, 401, "{path}");
        assert_eq!(
            get(format!("{path}?access_token={token}")).await,
            401,
            "{path} raw"
        );
        assert_eq!(
            get(format!(
                "{path}?access_token=a%2Fb+c%3Dd%25e%26f%3Fg%23h-0123456789"
            ))
            .await,
            401,
            "{path}: + is a space"
        );
    }
    // Next to the route's own parameters, which still work and are checked.
    assert_eq!(
        get(format!(
            "/api/tasks?limit=5&access_token={encoded}&status=queued"
        ))
        .await,
        200
    );
    assert_eq!(
        get(format!("/api/tasks?limit=0&access_token={encoded}")).await,
        400
    );
    assert_eq!(
        get(format!("/api/tasks?bogus=1&access_token={encoded}")).await,
        400
    );
    assert_eq!(
        get(format!("/api/dead/work?limit=5&access_token={encoded}")).await,
        200
    );
    assert_eq!(
        get(format!("/api/tasks/NOPE?access_token={encoded}")).await,
        404
    );
    let events = reqwest::get(format!("{}/api/events?access_token={encoded}", c.api.base))
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    // The header carries it as given.
    let (status, _) = c.api.with_token(token).get("/api/workers").await.unwrap();
    assert_eq!(status, 200);
    // Control needs the header: the query is for GETs only.
    let (status, _) = c
        .api
        .post_raw(&format!("/api/workers/x/pause?access_token={encoded}"), "")
        .await
        .unwrap();
    assert_eq!(status, 401);
}
