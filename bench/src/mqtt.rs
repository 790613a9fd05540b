//! MQTT mode: the same pattern against a broker (Mosquitto).
//!
//! A device publishes its readings with QoS 1 to `ems/<index>/reading`; the
//! PUBACK plays the hub's ack. A dashboard is one connection subscribed with
//! QoS 0 to the topics of the devices it follows (the natural MQTT set-up).
//! Payloads are the same bytes the hub mode sends.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::time::{interval_at, sleep_until, MissedTickBehavior};

use crate::stats::{find_epoch, find_seq, Stats};
use crate::tally::SeqTally;
use crate::{payload, Conns, Plan, RunArgs, SubResult};

pub struct Client {
    client: AsyncClient,
    el: EventLoop,
}

fn topic(dev: usize) -> String {
    format!("ems/{dev}/reading")
}

async fn connect(
    addr: SocketAddr,
    id: String,
    subs: &[usize],
    stats: &Stats,
) -> anyhow::Result<Client> {
    let t0 = Instant::now();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(64 * 1024, 64 * 1024)
        .set_request_channel_capacity(256)
        .set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 256);
    let fut = async {
        loop {
            match el.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        if !subs.is_empty() {
            let filters = subs
                .iter()
                .map(|&d| SubscribeFilter::new(topic(d), QoS::AtMostOnce));
            client.subscribe_many(filters).await?;
            loop {
                match el.poll().await? {
                    Event::Incoming(Packet::SubAck(_)) => break,
                    _ => continue,
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .context("MQTT connect timed out")??;
    stats.connect.record(t0.elapsed());
    Ok(Client { client, el })
}

pub async fn connect_all(
    a: &RunArgs,
    addr: SocketAddr,
    stats: &Arc<Stats>,
    subs: &[Vec<usize>],
) -> anyhow::Result<Conns<Client, Client>> {
    if !a.target.starts_with("mqtt://") {
        bail!("MQTT mode needs --target mqtt://127.0.0.1:PORT");
    }
    let conc = a.connect_concurrency.max(1);
    let run_id = std::process::id();
    let sub_conns: Vec<(Vec<usize>, Client)> =
        futures_util::stream::iter(subs.iter().cloned().enumerate())
            .map(|(i, devs)| {
                let stats = stats.clone();
                async move {
                    match connect(addr, format!("b{run_id}-dash-{i}"), &devs, &stats).await {
                        Ok(c) => Some((devs, c)),
                        Err(e) => {
                            if stats.connect_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("mqtt dashboard connect failed: {e:#}");
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
    let devices: Vec<(usize, Client)> = futures_util::stream::iter(0..a.devices)
        .map(|i| {
            let stats = stats.clone();
            async move {
                match connect(addr, format!("b{run_id}-dev-{i}"), &[], &stats).await {
                    Ok(c) => Some((i, c)),
                    Err(e) => {
                        if stats.connect_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("mqtt device connect failed: {e:#}");
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

pub async fn run_all(plan: Arc<Plan>, c: Conns<Client, Client>) -> Vec<SubResult> {
    let nsubs = c.subs.len();
    let stall_n = ((nsubs as f64) * plan.args.stall_fraction).round() as usize;
    let mut sub_tasks = Vec::with_capacity(nsubs);
    for (i, (devs, cl)) in c.subs.into_iter().enumerate() {
        let stalled = stall_n > 0 && (i * stall_n / nsubs) != ((i + 1) * stall_n / nsubs);
        sub_tasks.push(tokio::spawn(dashboard(plan.clone(), devs, cl, stalled)));
    }
    let mut dev_tasks = Vec::with_capacity(c.devices.len());
    for (i, cl) in c.devices {
        dev_tasks.push(tokio::spawn(device(plan.clone(), i, cl)));
    }
    for t in dev_tasks {
        let _ = t.await;
    }
    plan.senders_done.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    for t in sub_tasks {
        if let Ok(r) = t.await {
            out.extend(r);
        }
    }
    out
}

async fn device(plan: Arc<Plan>, idx: usize, cl: Client) {
    let Client { client, mut el } = cl;
    let a = &plan.args;
    let stats = plan.stats.clone();
    let pending: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::new()));
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The event loop runs in its own task (its poll is not cancel-safe):
    // PUBACKs arrive in publish order on one connection.
    let poller = {
        let pending = pending.clone();
        let stats = stats.clone();
        let closing = closing.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let sent = pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .pop_front();
                        if let Some(sent) = sent {
                            stats.record_ack(sent, stats.nanos());
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        if !closing.load(Ordering::Relaxed)
                            && stats.errors.fetch_add(1, Ordering::Relaxed) < 5
                        {
                            eprintln!("mqtt device {idx}: {e}");
                        }
                        break;
                    }
                }
            }
        })
    };
    let shared = &stats.devices[idx];
    if a.rate > 0.0 {
        let period = Duration::from_secs_f64(1.0 / a.rate);
        let phase = period.mul_f64(idx as f64 / a.devices.max(1) as f64);
        let mut tick = interval_at(plan.start + phase, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut buf = String::with_capacity(256);
        let t = topic(idx);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = sleep_until(plan.stop) => break,
                _ = tick.tick() => {
                    payload::reading(&mut buf, plan.epoch, seq, idx);
                    let now = stats.nanos();
                    shared.ring.put(seq, now);
                    pending.lock().unwrap_or_else(|p| p.into_inner()).push_back(now);
                    if client.publish(t.as_str(), QoS::AtLeastOnce, false, buf.clone().into_bytes()).await.is_err() {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    seq += 1;
                    shared.sent.store(seq, Ordering::Relaxed);
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Wait for the outstanding PUBACKs.
        loop {
            if pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
                || tokio::time::Instant::now() >= plan.deadline
                || poller.is_finished()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        sleep_until(plan.stop).await;
    }
    closing.store(true, Ordering::Relaxed);
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), poller).await;
}

async fn dashboard(plan: Arc<Plan>, devs: Vec<usize>, cl: Client, stalled: bool) -> Vec<SubResult> {
    let Client { client, mut el } = cl;
    // A topic subscribed twice on one connection is one subscription.
    let mut devs = devs;
    devs.sort_unstable();
    devs.dedup();
    let stall_at = plan.start + Duration::from_secs_f64(plan.args.stall_after);
    // Per followed device: deliveries and the readings they were.
    type Got = HashMap<usize, (u64, SeqTally)>;
    let got: Arc<Mutex<Got>> = Arc::new(Mutex::new(
        devs.iter()
            .map(|&d| (d, (0, SeqTally::default())))
            .collect(),
    ));
    // The event loop runs in its own task (its poll is not cancel-safe); a
    // stalled subscriber stops polling, i.e. stops reading its socket.
    let poller = {
        let plan = plan.clone();
        let got = got.clone();
        tokio::spawn(async move {
            let stats = &plan.stats;
            loop {
                if stalled && tokio::time::Instant::now() >= stall_at {
                    sleep_until(plan.deadline).await;
                    break;
                }
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let dev = p
                            .topic
                            .split('/')
                            .nth(1)
                            .and_then(|s| s.parse::<usize>().ok());
                        if let Some(dev) = dev {
                            let key = (find_epoch(&p.payload), find_seq(&p.payload));
                            if let (_, Some(seq)) = key {
                                stats.delivered(dev, seq);
                            }
                            let mut g = got.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(e) = g.get_mut(&dev) {
                                e.0 += 1;
                                match key {
                                    (Some(epoch), Some(seq)) => {
                                        e.1.record(epoch, seq);
                                    }
                                    _ => e.1.malformed(),
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !plan.senders_done.load(Ordering::Relaxed)
                            && stats.errors.fetch_add(1, Ordering::Relaxed) < 5
                        {
                            eprintln!("mqtt dashboard: {e}");
                        }
                        break;
                    }
                }
            }
        })
    };
    let stats = &plan.stats;
    // As in hub mode: completion is checked once sending has stopped.
    let mut check = tokio::time::interval_at(plan.stop, Duration::from_millis(50));
    loop {
        check.tick().await;
        if poller.is_finished() || tokio::time::Instant::now() >= plan.deadline {
            break;
        }
        if !stalled && plan.senders_done.load(Ordering::Relaxed) {
            let g = got.lock().unwrap_or_else(|p| p.into_inner());
            if g.iter()
                .all(|(d, e)| e.1.distinct() >= stats.devices[*d].sent.load(Ordering::Relaxed))
            {
                break;
            }
        }
    }
    poller.abort();
    let _ = client.try_disconnect();
    let mut g = got.lock().unwrap_or_else(|p| p.into_inner());
    devs.iter()
        .map(|d| {
            let (received, tally) = g.remove(d).unwrap_or_default();
            SubResult {
                device: *d,
                received,
                stalled,
                tally,
            }
        })
        .collect()
}
