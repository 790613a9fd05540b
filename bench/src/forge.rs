//! `ems-bench forge`: a flood of WebSocket handshakes with well-formed but
//! unknown device tokens (right prefix, length and checksum — anyone can
//! compute the CRC), at a fixed rate, each on a connection of its own. It
//! prints how the hub answered (by status) and how long the answers took;
//! real devices' handshakes are measured meanwhile by `ems-bench run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ems_hub::auth::token::{self, TokenKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::stats::Latency;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The hub: ws://127.0.0.1:8080 (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub target: String,
    /// Forged handshakes per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of flooding (at most 600).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Device ids the handshakes name: PREFIX0 … PREFIX(N-1), in turn.
    #[arg(long, default_value = "dev-")]
    pub prefix: String,
    /// How many device ids to cycle through.
    #[arg(long, default_value_t = 2000)]
    pub ids: usize,
    /// Source addresses 127.0.0.101..=127.0.0.(100+N).
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// Longest wait for one answer, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// How the flood went.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<String, u64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rate > 0.0 && a.rate <= 20_000.0,
        "--rate must be in (0, 20000]"
    );
    anyhow::ensure!(
        a.duration > 0.0 && a.duration <= 600.0,
        "--duration must be in (0, 600]"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(flood(a))
}

async fn flood(a: Args) -> anyhow::Result<()> {
    let addr = crate::loopback_target(&a.target).await?;
    let latency = Arc::new(Latency::new());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let total = (a.rate * a.duration).round() as u64;
    let every = Duration::from_secs_f64(1.0 / a.rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let limit = Duration::from_secs_f64(a.timeout);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let path = format!("/ws/device/{}{}", a.prefix, i as usize % a.ids.max(1));
        let src = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            101 + (i % u64::from(a.source_ips.max(1))) as u8,
        ));
        let (latency, tally) = (latency.clone(), tally.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let status = tokio::time::timeout(limit, one(addr, src, &path))
                .await
                .unwrap_or_else(|_| Ok("timeout".into()))
                .unwrap_or_else(|e| format!("error: {e}"));
            latency.record(t.elapsed());
            let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
            *tally.by_status.entry(status).or_default() += 1;
        });
        // Reap the finished ones as we go.
        while tasks.try_join_next().is_some() {}
    }
    let sent_in = t0.elapsed();
    while tasks.join_next().await.is_some() {}
    println!(
        "forged                 {total} handshakes in {:.2} s ({:.0}/s)",
        sent_in.as_secs_f64(),
        total as f64 / sent_in.as_secs_f64()
    );
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    for (status, n) in &tally.by_status {
        println!("forged status          {status}: {n}");
    }
    println!("{}", latency.line("latency forged answer"));
    Ok(())
}

/// One forged handshake: the answer's status code.
async fn one(addr: SocketAddr, src: std::net::IpAddr, path: &str) -> anyhow::Result<String> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = sock.connect(addr).await?;
    let forged = token::generate(TokenKind::Device);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {forged}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..n]);
    Ok(head
        .split_whitespace()
        .nth(1)
        .unwrap_or("no answer")
        .to_string())
}
