//! `guildhall-idle-clients ADDR N`: opens `N` TCP connections to `ADDR`
//! (a thousand connecting at a time), sends nothing on them, prints
//! `holding N connections` and keeps them until its standard input closes;
//! then resets them (no TIME_WAIT left behind) and exits. A process of its
//! own, so a test can hold more connections than one process may have open
//! files: run several.

use std::io::Read;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Connects in flight at once.
const WINDOW: usize = 1_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(Ok(n))) = (args.get(1), args.get(2).map(|n| n.parse::<usize>())) else {
        eprintln!("usage: guildhall-idle-clients ADDR N");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let held = rt.block_on(async {
        let mut held = Vec::with_capacity(n);
        let (mut started, mut failed) = (0usize, 0usize);
        let mut set = JoinSet::new();
        // A window of connects in flight, refilled as each one completes, so
        // one slow handshake (a SYN retried after a second) holds up no other.
        loop {
            while started < n && set.len() < WINDOW {
                let addr = addr.clone();
                set.spawn(async move { TcpStream::connect(addr).await });
                started += 1;
            }
            match set.join_next().await {
                Some(Ok(Ok(stream))) => held.push(stream),
                Some(Ok(Err(e))) => {
                    failed += 1;
                    eprintln!("connect: {e}");
                }
                Some(Err(e)) => panic!("{e}"),
                None => break,
            }
        }
        println!("holding {} connections ({failed} failed)", held.len());
        held
    });
    // Until the test closes our standard input.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for stream in &held {
        let _ = stream.set_zero_linger();
    }
    drop(held);
    drop(rt);
}
