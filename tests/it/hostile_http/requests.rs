//! Malformed and forged requests: bodies of the wrong type, too large or too
//! slow; forged `Host` and `Origin` headers.

use super::*;

/// A POST as written, with `content-type` (if any) and `body`.
fn post(addr: &str, path: &str, content_type: Option<&str>, body: &str) -> String {
    let ct = content_type.map_or(String::new(), |c| format!("Content-Type: {c}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The answer is `status` with a JSON `error` containing `needle`.
fn expect(raw: &Raw, status: u16, needle: &str) {
    let body = raw.json();
    assert_eq!(raw.status, status, "{}", raw.body);
    assert!(
        raw.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        raw.headers
    );
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(needle), "{error:?} lacks {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_posts_need_json_fit_their_limit_and_arrive_in_time() {
    let ns = TestNs::new("hh-body");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--http-body-timeout", "1s"])
        .await
        .unwrap();
    let a = addr(&c.api);
    let task = r#"{"stage": "work", "id": "H-1", "payload": "x"}"#;

    // 415: a form, text/plain (a cross-site page can send those), or nothing.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        for path in [
            "/api/tasks",
            "/api/dead/work/replay",
            "/api/workers/w1/concurrency",
        ] {
            let r = raw(&a, &post(&a, path, ct, task)).await;
            expect(&r, 415, "Content-Type: application/json");
        }
    }
    // The same body as JSON is taken.
    let r = raw(&a, &post(&a, "/api/tasks", Some("application/json"), task)).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // 413: over the route's limit, by Content-Length (nothing read) or as
    // it arrives (chunked).
    let big = format!(r#"{{"concurrency": 1, "x": "{}"}}"#, "a".repeat(2000));
    let r = raw(
        &a,
        &post(
            &a,
            "/api/workers/w1/concurrency",
            Some("application/json"),
            &big,
        ),
    )
    .await;
    expect(&r, 413, "at most 1 KiB");
    let huge = format!(
        "POST /api/tasks HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: 30000000\r\nConnection: close\r\n\r\n"
    );
    expect(&raw(&a, &huge).await, 413, "at most 24 MiB");
    let chunk = "b".repeat(3000);
    let chunked = format!(
        "POST /api/workers/w1/concurrency HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    expect(&raw(&a, &chunked).await, 413, "at most 1 KiB");
    let replay = format!(
        "POST /api/dead/work/replay HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\nConnection: close\r\n\r\n"
    );
    expect(&raw(&a, &replay).await, 413, "at most 2 MiB");

    // 408: a body that does not arrive.
    let slow = format!(
        "POST /api/tasks HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"stage\""
    );
    let started = std::time::Instant::now();
    expect(&raw(&a, &slow).await, 408, "--http-body-timeout");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Bodies that are JSON but wrong still get their 400.
    let r = raw(
        &a,
        &post(&a, "/api/tasks", Some("application/json"), "{nope"),
    )
    .await;
    expect(&r, 400, "invalid JSON body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_hosts_are_served_and_cross_origin_posts_refused() {
    let ns = TestNs::new("hh-host");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let a = addr(&c.api);
    let port = a.rsplit_once(':').unwrap().1.to_owned();
    let get = |host: &str| {
        format!("GET /api/workers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };

    // IP addresses and localhost: served, whatever the port.
    for host in [
        a.clone(),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "10.1.2.3:8080".to_owned(),
        format!("[::1]:{port}"),
        "127.0.0.1".to_owned(),
    ] {
        assert_eq!(raw(&a, &get(&host)).await.status, 200, "{host}");
    }
    // A rebinding page's own name, and junk: 421 with a JSON message.
    for host in [
        format!("evil.example:{port}"),
        "coordinator:8080".to_owned(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "a@b".to_owned(),
    ] {
        expect(&raw(&a, &get(&host)).await, 421, "--allowed-hosts");
    }
    // The absolute-form target counts as the host too.
    let absolute = format!(
        "GET http://evil.example/api/workers HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
    );
    expect(&raw(&a, &absolute).await, 421, "evil.example");
    // HTTP/1.0 without Host: 400.
    let r = raw(&a, "GET /api/workers HTTP/1.0\r\n\r\n").await;
    expect(&r, 400, "Host");
    // Open routes are checked too.
    let livez = "GET /livez HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    expect(&raw(&a, livez).await, 421, "evil.example");

    // A POST from another origin is refused; from the page's own, taken.
    let task = r#"{"stage": "work", "payload": "x"}"#;
    for origin in [
        "http://evil.example",
        "null",
        &format!("http://127.0.0.1:{}", port.parse::<u16>().unwrap() + 1),
    ] {
        let req = post(&a, "/api/tasks", Some("application/json"), task).replacen(
            "\r\n\r\n",
            &format!("\r\nOrigin: {origin}\r\n\r\n"),
            1,
        );
        expect(&raw(&a, &req).await, 403, "cross-origin");
    }
    let req = post(&a, "/api/tasks", Some("application/json"), task).replacen(
        "\r\n\r\n",
        &format!("\r\nOrigin: http://{a}\r\n\r\n"),
        1,
    );
    assert_eq!(raw(&a, &req).await.status, 201);
    let req = format!(
        "POST /api/workers/nobody/pause HTTP/1.1\r\nHost: {a}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    expect(&raw(&a, &req).await, 403, "cross-origin");

    // --allowed-hosts adds names; `*` allows any.
    let listed = spawn_coordinator(&ns, &["--allowed-hosts", "coordinator,*.example.org:80"])
        .await
        .unwrap();
    let b = addr(&listed.api);
    assert_eq!(raw(&b, &get("coordinator:8080")).await.status, 200);
    assert_eq!(raw(&b, &get("g.example.org:80")).await.status, 200);
    expect(
        &raw(&b, &get("g.example.org:8080")).await,
        421,
        "g.example.org",
    );
    expect(&raw(&b, &get("evil.example")).await, 421, "evil.example");
    let any = spawn_coordinator(&ns, &["--allowed-hosts", "*"])
        .await
        .unwrap();
    let d = addr(&any.api);
    assert_eq!(raw(&d, &get("evil.example")).await.status, 200);

    // A malformed list is a one-line error and status 2.
    let out = run_guildhall(&["serve", "--allowed-hosts", "ok,not a host"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allowed-hosts") && err.trim().lines().count() == 1,
        "{err}"
    );
}
