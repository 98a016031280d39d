//! A publisher that writes AMQP 0-9-1 frames by hand, for what a proper
//! client refuses to send but any client can: short strings that are not
//! UTF-8 (a `message_id` of `b"\xc3\x28"`, a header name of raw bytes),
//! header values in any encoding (arrays nested thousands deep).
//! lapin keeps short strings as `String`, so it cannot forge them; Python's
//! pika, say, sends whatever bytes it is given, and so does this.
//!
//! One connection per call: PLAIN login, a channel in confirm mode, one
//! mandatory publish, wait for the broker's ack (a return or a nack is an
//! error), close. Plain TCP only.

use anyhow::{Context, bail, ensure};
use guildhall_broker::AmqpUrl;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A message with its properties as raw bytes.
#[derive(Debug, Clone, Default)]
pub struct RawMessage {
    /// The `message_id` property's bytes, if set (any bytes, up to 255).
    pub message_id: Option<Vec<u8>>,
    /// Headers as (name bytes, long-string value bytes).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// More header table entries, already encoded (name, type, value),
    /// written after `headers`.
    pub raw_headers: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
}

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xce;

/// Publishes `message` to `exchange` with `routing_key` on the broker at
/// `url` (an `amqp://` URL), and waits for the broker to confirm it.
pub async fn publish(
    url: &str,
    exchange: &str,
    routing_key: &str,
    message: &RawMessage,
) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(10),
        publish_inner(url, exchange, routing_key, message),
    )
    .await
    .context("raw AMQP publish timed out")?
}

async fn publish_inner(
    url: &str,
    exchange: &str,
    routing_key: &str,
    message: &RawMessage,
) -> anyhow::Result<()> {
    let url = AmqpUrl::parse(url)?;
    let mut s = TcpStream::connect((url.host(), url.port()))
        .await
        .context("connect")?;
    s.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect_method(&mut s, (10, 10))
        .await
        .context("connection.start")?;
    let mut args = Vec::new();
    args.extend(0u32.to_be_bytes()); // client properties: an empty table
    short(&mut args, b"PLAIN");
    let response = format!("\0{}\0{}", url.username(), url.password());
    long(&mut args, response.as_bytes());
    short(&mut args, b"en_US");
    send_method(&mut s, 0, (10, 11), &args).await?;
    let tune = expect_method(&mut s, (10, 30))
        .await
        .context("connection.tune")?;
    ensure!(tune.len() >= 8, "short connection.tune");
    let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
    let mut args = Vec::new();
    args.extend(channel_max.to_be_bytes());
    args.extend(131_072u32.to_be_bytes());
    args.extend(0u16.to_be_bytes()); // no heartbeats: the connection is brief
    send_method(&mut s, 0, (10, 31), &args).await?;
    let mut args = Vec::new();
    short(&mut args, url.vhost().as_bytes());
    short(&mut args, b"");
    args.push(0);
    send_method(&mut s, 0, (10, 40), &args).await?;
    expect_method(&mut s, (10, 41))
        .await
        .context("connection.open")?;

    let mut args = Vec::new();
    short(&mut args, b"");
    send_method(&mut s, 1, (20, 10), &args).await?;
    expect_method(&mut s, (20, 11))
        .await
        .context("channel.open")?;
    send_method(&mut s, 1, (85, 10), &[0]).await?;
    expect_method(&mut s, (85, 11))
        .await
        .context("confirm.select")?;

    let mut args = Vec::new();
    args.extend(0u16.to_be_bytes());
    short(&mut args, exchange.as_bytes());
    short(&mut args, routing_key.as_bytes());
    args.push(1); // mandatory
    send_method(&mut s, 1, (60, 40), &args).await?;
    send_frame(&mut s, FRAME_HEADER, 1, &content_header(message)?).await?;
    send_frame(&mut s, FRAME_BODY, 1, &message.body).await?;
    loop {
        let (kind, _, payload) = read_frame(&mut s).await?;
        if kind != FRAME_METHOD {
            continue;
        }
        match method_id(&payload)? {
            (60, 80) => break,
            (60, 120) => bail!("the broker nacked the message"),
            (60, 50) => bail!("the broker returned the message (unroutable)"),
            (20, 40) => bail!("the broker closed the channel: {}", close_text(&payload)),
            (10, 50) => bail!("the broker closed the connection: {}", close_text(&payload)),
            _ => {}
        }
    }
    let mut args = Vec::new();
    args.extend(200u16.to_be_bytes());
    short(&mut args, b"bye");
    args.extend([0, 0, 0, 0]);
    send_method(&mut s, 0, (10, 50), &args).await?;
    let _ = expect_method(&mut s, (10, 51)).await;
    Ok(())
}

/// The content header: class 60, the body size, and the properties set
/// (delivery mode 2, then headers and message id if any), in flag order.
fn content_header(m: &RawMessage) -> anyhow::Result<Vec<u8>> {
    let mut flags = 0x1000u16; // delivery-mode
    let mut props = Vec::new();
    if !m.headers.is_empty() || !m.raw_headers.is_empty() {
        flags |= 0x2000;
        let mut table = Vec::new();
        for (name, value) in &m.headers {
            short(&mut table, name);
            table.push(b'S');
            long(&mut table, value);
        }
        table.extend(&m.raw_headers);
        props.extend(u32::try_from(table.len())?.to_be_bytes());
        props.extend(table);
    }
    props.push(2);
    if let Some(id) = &m.message_id {
        ensure!(id.len() <= 255, "a short string holds 255 bytes at most");
        flags |= 0x0080;
        short(&mut props, id);
    }
    let mut out = Vec::new();
    out.extend(60u16.to_be_bytes());
    out.extend(0u16.to_be_bytes());
    out.extend((m.body.len() as u64).to_be_bytes());
    out.extend(flags.to_be_bytes());
    out.extend(props);
    Ok(out)
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len().min(255) as u8);
    out.extend(&s[..s.len().min(255)]);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u32).to_be_bytes());
    out.extend(s);
}

async fn send_method(
    s: &mut TcpStream,
    channel: u16,
    (class, method): (u16, u16),
    args: &[u8],
) -> anyhow::Result<()> {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend(class.to_be_bytes());
    payload.extend(method.to_be_bytes());
    payload.extend(args);
    send_frame(s, FRAME_METHOD, channel, &payload).await
}

async fn send_frame(
    s: &mut TcpStream,
    kind: u8,
    channel: u16,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.push(kind);
    frame.extend(channel.to_be_bytes());
    frame.extend(u32::try_from(payload.len())?.to_be_bytes());
    frame.extend(payload);
    frame.push(FRAME_END);
    s.write_all(&frame).await?;
    Ok(())
}

async fn read_frame(s: &mut TcpStream) -> anyhow::Result<(u8, u16, Vec<u8>)> {
    let mut head = [0u8; 7];
    s.read_exact(&mut head).await.context("reading a frame")?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    ensure!(size <= 1 << 20, "frame of {size} bytes");
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload).await?;
    ensure!(payload.pop() == Some(FRAME_END), "bad frame end");
    Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
}

fn method_id(payload: &[u8]) -> anyhow::Result<(u16, u16)> {
    ensure!(payload.len() >= 4, "short method frame");
    Ok((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

/// Reads method frames until `want`; returns its arguments. A close from
/// the broker is an error with its text.
async fn expect_method(s: &mut TcpStream, want: (u16, u16)) -> anyhow::Result<Vec<u8>> {
    loop {
        let (kind, _, payload) = read_frame(s).await?;
        if kind == FRAME_HEARTBEAT || kind != FRAME_METHOD {
            continue;
        }
        let id = method_id(&payload)?;
        if id == want {
            return Ok(payload[4..].to_vec());
        }
        if id == (10, 50) || id == (20, 40) {
            bail!("the broker closed: {}", close_text(&payload));
        }
    }
}

/// The reply text of a `close` method.
fn close_text(payload: &[u8]) -> String {
    let len = payload.get(6).copied().unwrap_or(0) as usize;
    payload
        .get(7..7 + len)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default()
}
