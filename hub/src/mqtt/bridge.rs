//! The bridge's tasks and its handle.
//!
//! Two tasks: the *logic* task owns the [`State`] and feeds the rumqttc
//! client with non-blocking `try_publish` calls only (a full client buffer
//! leaves the message stalled in the state machine, retried shortly); the
//! *driver* task owns the rumqttc event loop — the only place that waits on
//! the network — and reports connects, losses and retained messages back.
//! The hub's calls go through a bounded queue into the logic task, so
//! nothing the hub does ever waits on the broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, EventLoop, MqttOptions, Outgoing as Out, Packet, QoS, Request, SubscribeFilter,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::config::MqttConfig;
use super::connect::{mqtt_options, MqttError};
use super::discovery::{self, Layout};
use super::state::{Input, Qos, Sample, State};
use super::stats::{Counters, MqttStats};

/// Requests the logic task may hand the rumqttc client before it has to
/// wait for the driver to write some out.
const CLIENT_CAPACITY: usize = 256;
/// Driver → logic events in flight.
const EVENT_CAPACITY: usize = 1024;
/// How soon a stalled message is retried.
const RETRY: Duration = Duration::from_millis(20);
/// Inputs applied per wake-up before publishing (keeps publishing going
/// under a flood of readings).
const INPUT_BATCH: usize = 512;
/// First and longest pause between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection up this long resets the back-off.
const STABLE: Duration = Duration::from_secs(10);
/// How long a clean shutdown may spend publishing `offline`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// At most one log line per kind of trouble per this.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The hub's side of the bridge. Cheap to clone; no method ever waits.
#[derive(Debug, Clone)]
pub struct MqttHandle {
    /// Into the logic task.
    tx: mpsc::Sender<Input>,
    /// Shared with the tasks.
    counters: Arc<Counters>,
    /// Set by [`MqttHandle::shutdown`].
    stop: Arc<watch::Sender<bool>>,
}

impl MqttHandle {
    /// A valid reading of `device_id` (after the gatekeeper). Never waits.
    pub fn reading(&self, device_id: &str, reading: &ems_shared::Reading) {
        self.send(Input::Reading {
            device: device_id.to_owned(),
            meter: reading.meter.clone(),
            sample: Sample {
                ts_ms: reading.ts_ms,
                rx_ms: now_ms(),
                values: discovery::values(reading),
            },
        });
    }

    /// The device connected (`true`) or its connection closed (`false`).
    /// Call on the registry's transitions, in order.
    pub fn presence(&self, device_id: &str, online: bool) {
        self.send(Input::Presence {
            device: device_id.to_owned(),
            online,
        });
    }

    /// The device was revoked or deleted: its discovery configs and its
    /// retained availability are removed from the broker, and its readings
    /// are ignored until it connects again.
    pub fn device_removed(&self, device_id: &str) {
        self.send(Input::Removed {
            device: device_id.to_owned(),
        });
    }

    /// The complete set of devices that may connect (from a successful
    /// store query, never a partial one). Devices the bridge knows of —
    /// also from configs an earlier hub process left on the broker — that
    /// are not in it are removed as by [`MqttHandle::device_removed`]: at
    /// once when not connected, else when their connection closes (a
    /// device revoked while connected, whose connection the hub is
    /// closing).
    pub fn active_devices<I, S>(&self, devices: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.send(Input::Active {
            devices: devices.into_iter().map(Into::into).collect(),
        });
    }

    /// The counters now.
    pub fn stats(&self) -> MqttStats {
        self.counters.snapshot()
    }

    /// Starts a clean shutdown: every online device and then the hub are
    /// published `offline`, the connection is closed with DISCONNECT, and
    /// the task returned by [`MqttBridge::spawn`] completes (within about
    /// three seconds even when the broker does not answer). Never waits.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    fn send(&self, input: Input) {
        if self.tx.try_send(input).is_err() {
            self.counters
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts bridges.
#[derive(Debug)]
pub struct MqttBridge;

impl MqttBridge {
    /// Validates `config`, prepares TLS (reads the CA file) and spawns the
    /// bridge on the current tokio runtime. The returned task completes
    /// after [`MqttHandle::shutdown`] (or once every handle is dropped).
    pub fn spawn(config: MqttConfig) -> Result<(MqttHandle, JoinHandle<()>), MqttError> {
        config.validate()?;
        let options = mqtt_options(&config)?;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (stop_tx, stop_rx) = watch::channel(false);
        let layout = Layout::new(&config);
        let state = State::new(layout, config.backfill_after, counters.clone());
        let task = tokio::spawn(run(
            options,
            state,
            rx,
            stop_rx,
            counters.clone(),
            config.interval,
            config.broker.to_string(),
        ));
        let handle = MqttHandle {
            tx,
            counters,
            stop: Arc::new(stop_tx),
        };
        Ok((handle, task))
    }
}

/// Driver → logic.
#[derive(Debug)]
enum Event {
    /// CONNACK received.
    Connected,
    /// The connection is gone; `lost_states` state messages that had been
    /// handed to the client went with it.
    Disconnected { lost_states: u64 },
    /// A retained message delivered for a new subscription.
    Retained {
        topic: String,
        payload: bytes::Bytes,
    },
}

/// Limits a kind of log line to one per [`LOG_EVERY`].
struct Every {
    last: Option<Instant>,
}

impl Every {
    fn new() -> Self {
        Every { last: None }
    }
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < LOG_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// The logic task: inputs, ticks and driver events in; publishes out.
async fn run(
    options: MqttOptions,
    mut state: State,
    mut inputs: mpsc::Receiver<Input>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    interval: Duration,
    broker: String,
) {
    let (client, eventloop) = AsyncClient::new(options, CLIENT_CAPACITY);
    let (ev_tx, mut events) = mpsc::channel(EVENT_CAPACITY);
    let (driver_stop, driver_stop_rx) = watch::channel(false);
    let mut driver = tokio::spawn(drive(
        eventloop,
        ev_tx,
        counters.clone(),
        driver_stop_rx,
        broker,
    ));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link = Link {
        client,
        connected: false,
        subscribe: None,
        stalled: false,
        shutting_down: false,
    };
    let mut losses = Losses::new(&counters);
    let mut driver_alive = true;

    loop {
        tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            ev = events.recv(), if driver_alive => match ev {
                Some(ev) => link.on_event(&mut state, ev),
                None => {
                    // Only a panic in the client ends the driver early.
                    log::error!("MQTT: the client task ended unexpectedly; nothing more is published");
                    driver_alive = false;
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    counters.connected.store(false, Ordering::Relaxed);
                    link.on_event(&mut state, Event::Disconnected { lost_states: 0 });
                }
            },
            input = inputs.recv() => match input {
                Some(i) => {
                    state.input(i);
                    for _ in 1..INPUT_BATCH {
                        match inputs.try_recv() {
                            Ok(i) => state.input(i),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                state.tick();
                losses.report(&counters);
            }
            _ = tokio::time::sleep(RETRY), if link.stalled => {}
        }
        link.flush(&mut state);
    }

    // Clean shutdown: devices and hub offline, then DISCONNECT (which
    // tells the broker not to send the last will).
    state.shutdown();
    link.shutting_down = true;
    link.subscribe = None;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while link.connected {
        link.flush(&mut state);
        if state.is_idle() {
            break;
        }
        tokio::select! {
            Some(ev) = events.recv() => link.on_event(&mut state, ev),
            _ = tokio::time::sleep(RETRY) => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if link.connected {
        let _ = link.client.try_disconnect();
    }
    driver_stop.send_replace(true);
    drop(events);
    if tokio::time::timeout_at(deadline, &mut driver)
        .await
        .is_err()
    {
        driver.abort();
        log::warn!("MQTT: the broker did not take the final messages within {SHUTDOWN_GRACE:?}; its last will marks the hub offline");
    }
    counters.connected.store(false, Ordering::Relaxed);
    losses.report(&counters);
    log::info!("MQTT bridge stopped");
}

/// The logic task's view of the client.
struct Link {
    client: AsyncClient,
    /// As last reported by the driver.
    connected: bool,
    /// Subscriptions still to hand to the client after a connect.
    subscribe: Option<Vec<String>>,
    /// The client had no room; retry soon.
    stalled: bool,
    /// Only the final `offline` messages are left to send.
    shutting_down: bool,
}

impl Link {
    fn on_event(&mut self, state: &mut State, ev: Event) {
        match ev {
            Event::Connected => {
                self.connected = true;
                let filters = state.connected();
                if !self.shutting_down {
                    self.subscribe = Some(filters.to_vec());
                }
            }
            Event::Disconnected { lost_states } => {
                self.connected = false;
                self.subscribe = None;
                self.stalled = false;
                state.disconnected(lost_states);
            }
            Event::Retained { topic, payload } => state.retained(&topic, &payload),
        }
    }

    /// Hands due messages to the client until it is full or nothing is due.
    fn flush(&mut self, state: &mut State) {
        self.stalled = false;
        if !self.connected {
            return;
        }
        if let Some(filters) = self.subscribe.take() {
            let subs = filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce));
            if self.client.try_subscribe_many(subs).is_err() {
                self.subscribe = Some(filters);
                self.stalled = true;
                return;
            }
        }
        let now = now_ms();
        while let Some(msg) = state.next(now) {
            let qos = match msg.qos {
                Qos::AtMostOnce => QoS::AtMostOnce,
                Qos::AtLeastOnce => QoS::AtLeastOnce,
            };
            let sent =
                self.client
                    .try_publish(msg.topic.clone(), qos, msg.retain, msg.payload.clone());
            if sent.is_err() {
                state.stall(msg);
                self.stalled = true;
                return;
            }
        }
    }
}

/// Rate-limited reporting of the loss counters.
struct Losses {
    queue_full: u64,
    backlog: u64,
    ignored: u64,
    every: Every,
}

impl Losses {
    fn new(c: &Counters) -> Self {
        Losses {
            queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            backlog: c.dropped_backlog.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            every: Every::new(),
        }
    }

    fn report(&mut self, c: &Counters) {
        let q = c.dropped_queue_full.load(Ordering::Relaxed);
        let b = c.dropped_backlog.load(Ordering::Relaxed);
        let i = c.ignored.load(Ordering::Relaxed);
        if (q, b, i) == (self.queue_full, self.backlog, self.ignored) || !self.every.ready() {
            return;
        }
        log::warn!(
            "MQTT: since the last report {} hub events dropped (bridge queue full), \
             {} state messages not delivered (broker slow or unreachable), \
             {} readings of removed devices or of the reserved id \"hub\" ignored",
            q - self.queue_full,
            b - self.backlog,
            i - self.ignored
        );
        (self.queue_full, self.backlog, self.ignored) = (q, b, i);
    }
}

/// The driver task: polls the rumqttc event loop (connects, writes, reads,
/// pings), backs off after errors, reports to the logic task.
async fn drive(
    mut el: EventLoop,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    broker: String,
) {
    let mut backoff = BACKOFF_MIN;
    // Since when the connection is up (`None`: down).
    let mut up_since: Option<Instant> = None;
    let mut ever_connected = false;
    let mut failures = 0u64;
    let mut failure_log = Every::new();
    let mut connect_log = Every::new();
    let mut loss_log = Every::new();
    loop {
        let stopping = *stop.borrow();
        let connected = up_since.is_some();
        if stopping && !connected {
            return;
        }
        // A connected event loop is never cancelled mid-write: `poll` is
        // only raced against the stop signal while it is connecting.
        let res = if connected {
            el.poll().await
        } else {
            tokio::select! {
                r = el.poll() => r,
                _ = stop.changed() => continue,
            }
        };
        match res {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                up_since = Some(Instant::now());
                counters.connected.store(true, Ordering::Relaxed);
                if !ever_connected {
                    log::info!("MQTT: connected to {broker}");
                } else {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    if connect_log.ready() {
                        log::info!(
                            "MQTT: reconnected to {broker} after {failures} failed attempt(s)"
                        );
                    }
                }
                ever_connected = true;
                failures = 0;
                if !stopping && events.send(Event::Connected).await.is_err() {
                    return;
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                if p.retain && !stopping {
                    let ev = Event::Retained {
                        topic: p.topic,
                        payload: p.payload,
                    };
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
            }
            Ok(rumqttc::Event::Outgoing(Out::Publish(_))) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(rumqttc::Event::Outgoing(Out::Disconnect)) => {
                if stopping {
                    counters.connected.store(false, Ordering::Relaxed);
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                // Unsent requests of the lost connection: a clean session
                // drops them anyway; the logic task rebuilds what matters.
                let lost_states = el
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(p) if p.qos == QoS::AtMostOnce))
                    .count() as u64;
                el.pending.clear();
                if let Some(since) = up_since.take() {
                    counters.connected.store(false, Ordering::Relaxed);
                    // Only a connection that lasted resets the back-off, so
                    // one that is dropped at once (e.g. a second client
                    // with the same id) does not reconnect in a tight loop.
                    if since.elapsed() >= STABLE {
                        backoff = BACKOFF_MIN;
                    }
                    if loss_log.ready() {
                        log::warn!("MQTT: connection to {broker} lost: {e}; reconnecting");
                    }
                    if stopping {
                        return;
                    }
                    if events
                        .send(Event::Disconnected { lost_states })
                        .await
                        .is_err()
                    {
                        return;
                    }
                } else {
                    failures += 1;
                    if failure_log.ready() {
                        log::warn!(
                            "MQTT: cannot connect to {broker}: {e} ({failures} failed attempt(s); \
                             retrying with back-off up to {BACKOFF_MAX:?})"
                        );
                    }
                }
                let pause = jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// `d` ± 25 %, so that many hubs do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let f = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(f)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::BrokerUrl;

    #[test]
    fn prometheus_text() {
        let s = MqttStats {
            connected: true,
            published: 5,
            dropped_queue_full: 2,
            dropped_backlog: 3,
            ..Default::default()
        };
        let mut o = String::new();
        s.render_prometheus(&mut o);
        assert!(o.contains("# TYPE ems_mqtt_connected gauge\nems_mqtt_connected 1\n"));
        assert!(o.contains("ems_mqtt_published_total 5\n"));
        assert!(o.contains("ems_mqtt_dropped_total{reason=\"queue_full\"} 2\n"));
        assert!(o.contains("ems_mqtt_dropped_total{reason=\"backlog\"} 3\n"));
        assert!(o.contains("ems_mqtt_reconnects_total 0\n"));
    }

    #[test]
    fn options_carry_will_and_credentials() {
        let mut c = MqttConfig::new(BrokerUrl::parse("mqtt://broker:1884").unwrap());
        c.username = Some("ems".into());
        c.password = Some(crate::mqtt::Secret::new("pw"));
        c.keep_alive = Duration::from_millis(10);
        let o = mqtt_options(&c).unwrap();
        assert_eq!(o.client_id(), "ems-hub-ems");
        assert_eq!(o.broker_address(), ("broker".to_string(), 1884));
        assert_eq!(o.keep_alive(), Duration::from_secs(1));
        let will = o.last_will().unwrap();
        assert_eq!(will.topic, "ems/hub/availability");
        assert_eq!(&will.message[..], b"offline");
        assert!(will.retain);
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("ems", "pw")
        );
    }

    #[test]
    fn tls_set_up() {
        // Without a CA file: the web PKI roots.
        let mut c = MqttConfig::new(BrokerUrl::parse("mqtts://broker").unwrap());
        assert!(mqtt_options(&c).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        c.ca_file = Some(p.clone());
        let e = mqtt_options(&c).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
        c.ca_file = Some(dir.path().join("missing.pem"));
        let e = mqtt_options(&c).unwrap_err().to_string();
        assert!(e.contains("cannot read CA file"), "{e}");
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(4));
            assert!(
                j >= Duration::from_secs(3) && j <= Duration::from_secs(5),
                "{j:?}"
            );
        }
    }
}
