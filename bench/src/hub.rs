//! Hub mode: device and dashboard WebSocket clients.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{interval_at, sleep_until, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::stats::{find_epoch, find_seq, Stats};
use crate::tally::SeqTally;
use crate::{payload, provision, source_ip, Conns, Plan, RunArgs, SubResult};

pub type Ws = WebSocketStream<TcpStream>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

async fn connect(
    addr: SocketAddr,
    src: std::net::IpAddr,
    url: &str,
    token: &str,
    ack_window_ms: u64,
    stats: &Stats,
) -> anyhow::Result<Ws> {
    let t0 = Instant::now();
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let stream = sock.connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    if ack_window_ms > 0 {
        req.headers_mut().insert(
            ems_shared::ACK_WINDOW_HEADER,
            HeaderValue::from(ack_window_ms),
        );
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .with_context(|| format!("handshake {url}"))?;
    stats.connect.record(t0.elapsed());
    Ok(ws)
}

/// Opens every subscription, then every device connection.
pub async fn connect_all(
    a: &RunArgs,
    addr: SocketAddr,
    stats: &Arc<Stats>,
    subs: &[Vec<usize>],
) -> anyhow::Result<Conns<Ws, Ws>> {
    let path = a
        .tokens
        .as_ref()
        .context("hub mode needs --tokens FILE (ems-bench provision)")?;
    let tokens = provision::load(path)?;
    if tokens.devices.len() < a.devices {
        bail!(
            "{} has {} devices, --devices is {}",
            path.display(),
            tokens.devices.len(),
            a.devices
        );
    }
    let base = a.target.trim_end_matches('/').to_owned();
    let flat: Vec<usize> = subs.iter().flatten().copied().collect();
    let viewer = match (&tokens.viewer, flat.is_empty()) {
        (Some(v), _) => v.clone(),
        (None, true) => String::new(),
        (None, false) => bail!(
            "{} has no @viewer line; dashboards need one",
            path.display()
        ),
    };
    let conc = a.connect_concurrency.max(1);
    let window = a.ack_window_ms;
    let nsrc = a.source_ips;

    let sub_conns: Vec<(Vec<usize>, Ws)> = futures_util::stream::iter(flat.into_iter().enumerate())
        .map(|(i, dev)| {
            let url = format!("{base}/ws/dashboard/{}", tokens.devices[dev].0);
            let viewer = viewer.clone();
            let stats = stats.clone();
            async move {
                match connect(addr, source_ip(i, nsrc), &url, &viewer, 0, &stats).await {
                    Ok(ws) => Some((vec![dev], ws)),
                    Err(e) => {
                        if stats.connect_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("dashboard connect failed: {e:#}");
                        }
                        None
                    }
                }
            }
        })
        .buffer_unordered(conc)
        .filter_map(|x| async move { x })
        .collect()
        .await;

    let t0 = Instant::now();
    let offset = sub_conns.len();
    let devices: Vec<(usize, Ws)> = futures_util::stream::iter(0..a.devices)
        .map(|i| {
            let (id, tok) = &tokens.devices[i];
            let url = format!("{base}/ws/device/{id}");
            let tok = tok.clone();
            let stats = stats.clone();
            async move {
                match connect(
                    addr,
                    source_ip(offset + i, nsrc),
                    &url,
                    &tok,
                    window,
                    &stats,
                )
                .await
                {
                    Ok(ws) => Some((i, ws)),
                    Err(e) => {
                        if stats.connect_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("device connect failed: {e:#}");
                        }
                        None
                    }
                }
            }
        })
        .buffer_unordered(conc)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    Ok(Conns {
        devices,
        subs: sub_conns,
        device_connect_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Runs every device and subscription until done; returns per-subscription
/// results.
pub async fn run_all(plan: Arc<Plan>, c: Conns<Ws, Ws>) -> Vec<SubResult> {
    let nsubs = c.subs.len();
    let stall_n = ((nsubs as f64) * plan.args.stall_fraction).round() as usize;
    let mut sub_tasks = Vec::with_capacity(nsubs);
    for (i, (devs, ws)) in c.subs.into_iter().enumerate() {
        // Spread the stalled ones evenly: subscription i stalls when the
        // running count of stalls steps at i.
        let stalled = stall_n > 0 && (i * stall_n / nsubs) != ((i + 1) * stall_n / nsubs);
        sub_tasks.push(tokio::spawn(dashboard(plan.clone(), devs[0], ws, stalled)));
    }
    let mut dev_tasks = Vec::with_capacity(c.devices.len());
    for (i, ws) in c.devices {
        dev_tasks.push(tokio::spawn(device(plan.clone(), i, ws)));
    }
    for t in dev_tasks {
        let _ = t.await;
    }
    plan.senders_done.store(true, Ordering::Relaxed);
    let mut out = Vec::with_capacity(nsubs);
    for t in sub_tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

async fn device(plan: Arc<Plan>, idx: usize, mut ws: Ws) {
    let a = &plan.args;
    let stats = &plan.stats;
    let shared = &stats.devices[idx];
    let sending = a.rate > 0.0;
    let period = Duration::from_secs_f64(1.0 / a.rate.max(1e-3));
    let phase = period.mul_f64(idx as f64 / a.devices.max(1) as f64);
    let mut tick = interval_at(plan.start + phase, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut pending: VecDeque<(u64, u64)> = VecDeque::new();
    let mut seq = 0u64;
    let mut buf = String::with_capacity(256);
    // With --rate 0 the connection is only held until the stop time.
    let mut done_sending = false;
    loop {
        if done_sending && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let b = t.as_bytes();
                    if b.starts_with(b"{\"type\":\"ack\"") {
                        if let Some(s) = find_seq(b) {
                            let now = stats.nanos();
                            while pending.front().is_some_and(|&(q, _)| q <= s) {
                                if let Some((_, sent)) = pending.pop_front() {
                                    stats.record_ack(sent, now);
                                }
                            }
                        }
                    } else if b.starts_with(b"{\"type\":\"rejected\"") {
                        if stats.rejected.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("rejected: {}", t.as_str());
                        }
                        if let Some(s) = find_seq(b) {
                            pending.retain(|&(q, _)| q != s);
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    stats.closed_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("device {idx}: {e}");
                    }
                    return;
                }
            },
            _ = sleep_until(plan.deadline) => break,
            _ = sleep_until(plan.stop), if !done_sending => done_sending = true,
            _ = tick.tick(), if sending && !done_sending => {
                payload::reading(&mut buf, plan.epoch, seq, idx);
                let t = stats.nanos();
                shared.ring.put(seq, t);
                pending.push_back((seq, t));
                if let Err(e) = ws.send(Message::Text(buf.as_str().into())).await {
                    if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("device {idx}: send: {e}");
                    }
                    return;
                }
                seq += 1;
                shared.sent.store(seq, Ordering::Relaxed);
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

async fn dashboard(plan: Arc<Plan>, dev: usize, mut ws: Ws, stalled: bool) -> SubResult {
    let stats = &plan.stats;
    let stall_at = plan.start + Duration::from_secs_f64(plan.args.stall_after);
    let mut received = 0u64;
    let mut tally = SeqTally::default();
    // Completion is checked only once sending has stopped: a 50 ms timer
    // per subscription from the start cost the generator 20 wake-ups per
    // second per subscription (192,000/s in scenario 2).
    let mut check = interval_at(plan.stop, Duration::from_millis(50));
    loop {
        tokio::select! {
            biased;
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let b = t.as_bytes();
                    if b.starts_with(b"{\"type\":\"reading\"") {
                        received += 1;
                        match (find_epoch(b), find_seq(b)) {
                            (Some(epoch), Some(seq)) => {
                                stats.delivered(dev, seq);
                                tally.record(epoch, seq);
                            }
                            _ => tally.malformed(),
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    if !plan.senders_done.load(Ordering::Relaxed) {
                        stats.closed_early.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("dashboard for {dev}: {e}");
                    }
                    break;
                }
            },
            _ = sleep_until(stall_at), if stalled => {
                // Stop reading; keep the socket open until the deadline.
                sleep_until(plan.deadline).await;
                break;
            }
            _ = sleep_until(plan.deadline) => break,
            _ = check.tick() => {
                // Distinct readings, not deliveries: a duplicate must not
                // stand in for a reading still on its way.
                if plan.senders_done.load(Ordering::Relaxed)
                    && tally.distinct() >= stats.devices[dev].sent.load(Ordering::Relaxed)
                {
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    SubResult {
        device: dev,
        received,
        stalled,
        tally,
    }
}
