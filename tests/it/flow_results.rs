//! Stored flow results (issue 19), end to end on the real broker with the
//! real binaries: a fan-out child whose result is 1 MiB has it stored in
//! `<ns>.results` by its agent; the join's payload refers to it
//! (`result_ref`) while the small results travel inline; the reference's
//! URL returns the exact bytes. Hostile readers: a forged message under the
//! child's id, a forged or malformed digest, a bad id, an unknown
//! parameter, a reader without the token. A coordinator restarted without
//! a snapshot resolves the reference again.

use guildhall_proto::flow;
use guildhall_tests::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;

const TOKEN: &str = "results-token-for-the-flow-test";
/// The large child's padding: its result is a little over 1 MiB.
const PAD: usize = 1 << 20;

/// GET `path` from the coordinator with or without the token: status,
/// body bytes and the digest header.
async fn get(base: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>, Option<String>) {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("the coordinator answers");
    let status = r.status().as_u16();
    let digest = r
        .headers()
        .get("x-guildhall-result-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, r.bytes().await.expect("a body").to_vec(), digest)
}

/// The `error` of a JSON error answer.
fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("not a JSON error: {}", String::from_utf8_lossy(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_child_result_reaches_the_join_as_a_reference_its_url_resolves() {
    let ns = TestNs::new("flow-results");
    let coordinator = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let api = coordinator.api.with_token(TOKEN);
    let base = coordinator.api.base.clone();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let mut agents = Vec::new();
    for (id, stage, extra) in [
        (
            "split-1",
            "split",
            &["--next", "kid", "--join", "merge"][..],
        ),
        ("kid-1", "kid", &[][..]),
        ("merge-1", "merge", &[][..]),
    ] {
        let mut flags = vec!["--worker-url", worker.url.as_str()];
        flags.extend(extra);
        agents.push(spawn_agent(&ns, id, stage, &flags).await.unwrap());
    }
    let body = json!({
        "stage": "split",
        "id": "P",
        "payload": format!("fanout=3 child:pad={PAD} child:padonly=1"),
    });
    // Accepted once the split agent has declared its stage.
    eventually(Duration::from_secs(20), "P submitted", || async {
        match api.post_raw("/api/tasks", &body.to_string()).await? {
            (code, _) if (200..300).contains(&code) => Ok(()),
            (code, answer) => anyhow::bail!("{code}: {answer}"),
        }
    })
    .await;

    // The join's payload, as the merge stage's worker was given it.
    let join: Value = eventually(Duration::from_secs(60), "the join's payload", || async {
        let inputs = worker.inputs().await?;
        let body = inputs
            .get("P/merge/1")
            .ok_or_else(|| anyhow::anyhow!("not joined yet: {:?}", inputs.keys()))?;
        Ok(serde_json::from_str(body)?)
    })
    .await;
    let children = join["children"].as_array().expect("children");
    assert_eq!(children.len(), 3, "{join}");
    for i in [0, 2] {
        assert_eq!(
            children[i]["result_text"],
            format!("pad={PAD} padonly=1 n={i} @kid"),
            "child {i} travels inline"
        );
        assert!(children[i].get("result_ref").is_none());
    }
    let big = &children[1];
    let want = format!("pad={PAD} padonly=1 n=1 @kid {}", "x".repeat(PAD));
    let digest: [u8; 32] = Sha256::digest(want.as_bytes()).into();
    let hex = flow::digest_hex(&digest);
    assert_eq!(big["status"], "succeeded");
    assert_eq!(big["result_bytes"], want.len());
    assert!(big.get("result_text").is_none() && big.get("result_omitted").is_none());
    let reference = &big["result_ref"];
    assert_eq!(reference["stream"], ns.names.results_stream().as_str());
    assert_eq!(reference["message_id"], "P:1");
    assert_eq!(reference["sha256"], hex.as_str());
    let url = reference["url"].as_str().expect("a URL");
    assert_eq!(url, format!("/api/results/P:1?sha256={hex}"));

    // The URL returns the exact bytes, with their digest.
    let (status, bytes, header) = get(&base, url, Some(TOKEN)).await;
    assert_eq!(status, 200, "{}", error_of(&bytes));
    assert_eq!(bytes.len(), want.len());
    assert!(bytes == want.as_bytes(), "the stored result's bytes differ");
    assert_eq!(header.as_deref(), Some(hex.as_str()));
    // Without the digest too: the coordinator remembers the join's.
    let (status, bytes, _) = get(&base, "/api/results/P:1", Some(TOKEN)).await;
    assert_eq!((status, bytes.len()), (200, want.len()));

    // Hostile readers.
    // A forged message under the child's id, larger than the inline limit:
    // never answered for the reported digest, nor found under its own.
    let broker = Broker::connect(&ns).await.unwrap();
    let forged = vec![b'f'; flow::MAX_INLINE_RESULT + 10];
    broker
        .publisher
        .publish(
            "",
            &ns.names.results_stream(),
            &forged,
            lapin::BasicProperties::default().with_message_id("P:1".into()),
        )
        .await
        .unwrap();
    let forged_hex = flow::digest_hex(&Sha256::digest(&forged).into());
    let (status, bytes, _) = get(&base, url, Some(TOKEN)).await;
    assert!(status == 200 && bytes == want.as_bytes(), "{status}");
    let (status, body, _) = get(
        &base,
        &format!("/api/results/P:1?sha256={forged_hex}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{}", error_of(&body));
    // A made-up digest, for a child and for a task that is no child.
    let zeros = "0".repeat(64);
    for path in [
        format!("/api/results/P:1?sha256={zeros}"),
        format!("/api/results/Q:7?sha256={zeros}"),
        "/api/results/Q:7".to_owned(),
    ] {
        let (status, body, _) = get(&base, &path, Some(TOKEN)).await;
        assert_eq!(status, 404, "{path}: {}", error_of(&body));
        assert!(!error_of(&body).is_empty());
    }
    // An inline result is answered only while its join holds it; once
    // handed on (the release read back), it is the join's.
    eventually(Duration::from_secs(10), "P:0 handed on", || async {
        match get(&base, "/api/results/P:0", Some(TOKEN)).await {
            (404, body, _) if !error_of(&body).is_empty() => Ok(()),
            (status, body, _) => anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body)),
        }
    })
    .await;
    // Malformed: a bad digest, a bad id, an unknown parameter.
    for path in [
        "/api/results/P:1?sha256=zz".to_owned(),
        format!("/api/results/P:1?sha256={}", "a".repeat(65)),
        format!("/api/results/P:1?sha256=%2B{}", "1".repeat(63)),
        "/api/results/bad%20id?sha256=00".to_owned(),
        format!("/api/results/{}", "x".repeat(200)),
        format!("/api/results/P:1?sha256={hex}&offset=0"),
    ] {
        let (status, body, _) = get(&base, &path, Some(TOKEN)).await;
        assert_eq!(status, 400, "{path}: {}", error_of(&body));
    }
    // A reader without the token gets no worker-written bytes.
    let (status, body, _) = get(&base, url, None).await;
    assert_eq!(status, 403, "{}", error_of(&body));
    let (status, body, _) = get(&base, url, Some("wrong")).await;
    assert!(matches!(status, 401 | 403), "{status}: {}", error_of(&body));

    // A coordinator killed and started again without a snapshot reads the
    // results stream again: the reference resolves as before.
    let mut coordinator = coordinator;
    coordinator.proc.signal("KILL");
    let _ = coordinator.proc.child.wait().await;
    let coordinator = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let base = coordinator.api.base.clone();
    let bytes = eventually(
        Duration::from_secs(30),
        "the result after a restart",
        || async {
            match get(&base, url, Some(TOKEN)).await {
                (200, bytes, _) => Ok(bytes),
                (status, body, _) => anyhow::bail!("{status}: {}", error_of(&body)),
            }
        },
    )
    .await;
    assert!(bytes == want.as_bytes(), "the stored result's bytes differ");

    drop(agents);
    drop(coordinator);
}
