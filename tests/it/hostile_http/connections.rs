//! Connections that hold the server: 20,000 idle sockets (held by helper
//! processes, `guildhall-idle-clients`), slowloris heads, idle keep-alives,
//! and more event streams than allowed.

use super::*;
use std::time::Instant;
use tokio::task::JoinSet;

const TOKEN: &str = "hostile-token-0123456789";
/// Idle connections the flood test opens.
const FLOOD: usize = 20_000;

/// Idle connections held by one `guildhall-idle-clients` process (each
/// process may have 20,000 open files here, and cannot raise that).
const PER_PROCESS: usize = 10_000;

/// A `guildhall-idle-clients` process holding connections open.
struct IdleClients {
    /// The process; it resets its connections and exits when its standard
    /// input closes.
    child: tokio::process::Child,
}

/// Starts processes holding `n` idle connections to `addr` between them;
/// returns once every connection is open.
async fn hold_idle(addr: &str, n: usize) -> Vec<IdleClients> {
    use tokio::io::AsyncBufReadExt;
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let count = left.min(PER_PROCESS);
        left -= count;
        let mut child = tokio::process::Command::new(bin("guildhall-idle-clients"))
            .args([addr, &count.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn guildhall-idle-clients");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::BufReader::new(stdout).lines().next_line(),
        )
        .await
        .expect("connections opened within 60 s")
        .unwrap()
        .unwrap_or_default();
        assert!(
            line.starts_with(&format!("holding {count} connections (0 failed)")),
            "{line}"
        );
        out.push(IdleClients { child });
    }
    out
}

/// Closes every connection the processes hold (with a reset) and waits for
/// them to exit.
async fn release(clients: Vec<IdleClients>) {
    for mut c in clients {
        drop(c.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(20), c.child.wait()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_answering_under_twenty_thousand_idle_connections() {
    // Alone: it takes 20,000 ports and file descriptors, and measures memory.
    // The connections come from other processes: this one may not open as
    // many files (and cannot raise its hard limit without CAP_SYS_RESOURCE).
    let ns = TestNs::exclusive("hh-flood");
    let started = Instant::now();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let pid = c.proc.pid();
    let api = c.api.with_token(TOKEN);
    api.get_ok("/api/workers").await.unwrap();
    let before = rss_mib(pid);

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_mib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let idle = hold_idle(&addr(&c.api), FLOOD).await;
    let opened_in = started.elapsed();
    // While they are all open on this side, the API answers.
    eventually(Duration::from_secs(30), "/livez and a read", || async {
        let fresh = Api::new(&c.api.base).with_token(TOKEN);
        fresh.get_ok("/livez").await?;
        fresh.get_ok("/api/workers").await?;
        Ok(())
    })
    .await;
    let m = api.metrics().await.unwrap();
    let open = m.value("guildhall_http_connections", &[]).unwrap();
    let closed = |reason| {
        m.value(
            "guildhall_http_connections_closed_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    let (shed, timed_out) = (closed("shed"), closed("header_timeout"));
    assert!(open <= 1024.0, "{open} connections open (limit 1024)");
    // Idle ones made room for new ones (the kernel holds back what does
    // not fit its accept queue: not every one reaches the server).
    assert!(shed > 0.0, "{shed} shed, {timed_out} timed out");
    release(idle).await;
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);

    // Memory goes back down once they are gone.
    let after = eventually(Duration::from_secs(30), "memory back down", || async {
        let now = rss_mib(pid);
        anyhow::ensure!(now <= before + 64, "{now} MiB (was {before} MiB)");
        Ok(now)
    })
    .await;
    eventually(Duration::from_secs(30), "the connections gone", || async {
        let m = api.metrics().await?;
        let open = m.value("guildhall_http_connections", &[]).unwrap_or(-1.0);
        anyhow::ensure!(open <= 2.0, "{open} open");
        Ok(())
    })
    .await;
    eprintln!(
        "hostile_http: {FLOOD} idle connections opened in {opened_in:?}; coordinator RSS {before} MiB before, {peak} MiB at most while they were open, {after} MiB after; {shed} shed, {timed_out} cut at the header time-out; whole test {:?}",
        started.elapsed()
    );
    assert!(peak <= before + 128, "peak {peak} MiB (was {before} MiB)");
    assert!(started.elapsed() < Duration::from_secs(90));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_cut_and_kept_alive_ones_idle_longer() {
    let ns = TestNs::new("hh-slow");
    let c = spawn_coordinator(
        &ns,
        &["--http-header-timeout", "2s", "--http-idle-timeout", "5s"],
    )
    .await
    .unwrap();
    let addr = addr(&c.api);

    // 50 clients dribbling a request head, a byte every 250 ms, and one
    // that says nothing: all cut at the header time-out.
    let mut set = JoinSet::new();
    for i in 0..51 {
        let addr = addr.clone();
        set.spawn(async move {
            let start = Instant::now();
            let stream = TcpStream::connect(&addr).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let dribble = async move {
                if i == 0 {
                    return std::future::pending::<()>().await; // silent
                }
                let head = format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
                let _ = wr.write_all(head.as_bytes()).await;
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if wr.write_all(b"a").await.is_err() {
                        return std::future::pending::<()>().await;
                    }
                }
            };
            let mut buf = [0u8; 256];
            let cut = async {
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            tokio::select! {
                _ = dribble => unreachable!(),
                _ = cut => {}
                _ = tokio::time::sleep(Duration::from_secs(15)) => panic!("connection {i} not cut"),
            }
            start.elapsed()
        });
    }
    // The API answers meanwhile.
    c.api.get_ok("/livez").await.unwrap();
    let mut cut_after = Vec::new();
    while let Some(d) = set.join_next().await {
        cut_after.push(d.unwrap());
    }
    cut_after.sort();
    let (first, last) = (cut_after[0], cut_after[cut_after.len() - 1]);
    eprintln!("hostile_http: 51 slow or silent connections cut after {first:?} to {last:?}");
    assert!(first >= Duration::from_millis(1900), "{first:?}");
    assert!(last <= Duration::from_secs(5), "{last:?}");

    // A kept-alive connection may idle past the header time-out, and is cut
    // at the idle time-out.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    let get = format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    kept.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut kept).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    kept.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut kept).await.unwrap().status, 200);
    let idle_from = Instant::now();
    assert!(closed_within(&mut kept, Duration::from_secs(10)).await);
    let idled = idle_from.elapsed();
    assert!(
        idled >= Duration::from_millis(4900) && idled <= Duration::from_secs(8),
        "{idled:?}"
    );

    let m = c.api.metrics().await.unwrap();
    let closed = |reason| {
        m.value(
            "guildhall_http_connections_closed_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert!(closed("header_timeout") >= 51.0, "{}", m.text);
    assert!(closed("idle_timeout") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_bounded() {
    let ns = TestNs::new("hh-sse");
    let c = spawn_coordinator(&ns, &["--http-max-event-streams", "2"])
        .await
        .unwrap();
    let url = format!("{}/api/events", c.api.base);
    let first = reqwest::get(&url).await.unwrap();
    let second = reqwest::get(&url).await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = reqwest::get(&url).await.unwrap();
    assert_eq!(third.status(), 503);
    let body: Value = third.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--http-max-event-streams"),
        "{body}"
    );
    let m = c.api.metrics().await.unwrap();
    assert_eq!(m.value("guildhall_http_event_streams", &[]), Some(2.0));
    // A stream that ends frees its place.
    drop(first);
    eventually(Duration::from_secs(20), "a place again", || async {
        let again = reqwest::get(&url).await?;
        anyhow::ensure!(again.status() == 200, "{}", again.status());
        Ok(())
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_lowers_the_connection_limit_instead_of_failing_accept() {
    let ns = TestNs::new("hh-nofile");
    // 400 files at most (soft and hard): 80 connections, 320 kept for the rest.
    let script = "ulimit -n 400 && exec \"$0\" \"$@\"".to_owned();
    let args = vec![
        "-c".to_owned(),
        script,
        bin("guildhall").display().to_string(),
        "serve".into(),
        "--namespace".into(),
        ns.name().into(),
        "--amqp-url".into(),
        amqp_url(),
        "--management-url".into(),
        management_url(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let (proc, line) = spawn_logged(
        &ns,
        "coordinator",
        &"/bin/sh".into(),
        &args,
        &[],
        Some("listening on http://"),
    )
    .await
    .unwrap();
    let line = line.unwrap();
    let base = &line[line.find("http://").unwrap()..];
    let api = Api::new(base.split_whitespace().next().unwrap());
    // 1,000 idle connections: the server sheds them, and never runs out of
    // files to accept a real client with.
    let idle = hold_idle(&addr(&api), 1_000).await;
    eventually(Duration::from_secs(20), "/livez and a read", || async {
        let fresh = Api::new(&api.base);
        fresh.get_ok("/livez").await?;
        fresh.get_ok("/api/workers").await?;
        Ok(())
    })
    .await;
    let m = api.metrics().await.unwrap();
    let open = m.value("guildhall_http_connections", &[]).unwrap();
    assert!(open <= 80.0, "{open} open");
    release(idle).await;
    let log = proc.log_text();
    assert!(
        log.contains("at most 80 HTTP connections instead of --http-max-connections 1024"),
        "{log}"
    );
    assert!(!log.contains("cannot accept"), "{log}");
}
