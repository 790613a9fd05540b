//! A private Mosquitto for the MQTT tests: a broker on a free loopback
//! port with a generated config (persistence off; optionally a password
//! file or TLS with a throwaway CA), and a watching MQTT client that
//! records every message. Without Mosquitto the tests print a loud SKIP and
//! pass — unless `EMS_REQUIRE_MQTT=1` (CI), where they fail
//! (`ems_testkit::require`).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ems_testkit::certs::make_server_certificates;
use ems_testkit::fixtures::free_port;
use ems_testkit::require::{require_or_skip, Feature};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// Bound for anything MQTT should do "soon" (reconnects back off up to
/// several seconds; the machine may be loaded).
pub(crate) const LONG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// A private Mosquitto.

pub(crate) fn skip(why: &str) {
    require_or_skip(Feature::Mqtt, why);
}

pub(crate) fn mosquitto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMS_MOSQUITTO") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[derive(Default)]
pub(crate) struct BrokerOptions {
    /// (user, password): anonymous clients refused.
    pub(crate) user: Option<(String, String)>,
    /// Serve TLS (needs `openssl`) instead of plain MQTT.
    pub(crate) tls: bool,
}

pub(crate) struct Broker {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    child: Option<Child>,
    /// The CA that signed the broker's certificate (TLS only).
    pub(crate) ca: Option<PathBuf>,
    /// The login the broker requires, if any (the watchers use it too).
    pub(crate) login: Option<(String, String)>,
}

impl Broker {
    /// Starts a broker, or returns `None` after a SKIP.
    pub(crate) fn start(opts: BrokerOptions) -> Option<Broker> {
        let Some(bin) = mosquitto_bin() else {
            skip("mosquitto is not installed (looked at $EMS_MOSQUITTO, /usr/sbin, /usr/bin, /usr/local/sbin)");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\npersistence false\nlog_dest file {}\n\
             log_type error\nlog_type warning\nlog_type notice\n",
            dir.path().join("mosquitto.log").display()
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Keep root, so the broker can read the files in our temp dir.
            conf.push_str("user root\n");
        }
        match &opts.user {
            Some((user, pw)) => {
                let file = dir.path().join("passwd");
                let out = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([user, pw])
                    .output();
                match out {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => panic!(
                        "mosquitto_passwd failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ),
                    Err(e) => {
                        skip(&format!("mosquitto_passwd cannot run: {e}"));
                        return None;
                    }
                }
                conf.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    file.display()
                ));
            }
            None => conf.push_str("allow_anonymous true\n"),
        }
        let mut ca = None;
        if opts.tls {
            if let Err(e) = make_server_certificates(dir.path()) {
                skip(&format!("cannot make TLS certificates: {e}"));
                return None;
            }
            let d = dir.path();
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                d.join("ca.crt").display(),
                d.join("server.crt").display(),
                d.join("server.key").display()
            ));
            ca = Some(d.join("ca.crt"));
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write config");
        let mut b = Broker {
            bin,
            dir,
            port,
            child: None,
            ca,
            login: opts.user,
        };
        b.launch();
        Some(b)
    }

    /// Starts the broker process (again, after [`Broker::stop`]).
    pub(crate) fn launch(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mosquitto exited at start ({st}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Stops the broker (SIGTERM) and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        if self.ca.is_some() {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGKILL ends a stopped (SIGSTOP) broker too.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// A watching MQTT client.

#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

impl Msg {
    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).unwrap_or("<binary>")
    }
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// Subscribes to `filters`, records every message; resubscribes after a
/// broker restart. `synced` turns true once every retained message of the
/// first subscription has arrived (a marker published after the SUBACK
/// has come back).
pub(crate) struct Watcher {
    msgs: Arc<Mutex<Vec<Msg>>>,
    synced: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

static WATCHERS: AtomicU64 = AtomicU64::new(0);

impl Watcher {
    /// Starts watching `broker` (with its login, if it needs one).
    pub(crate) fn start(broker: &Broker, filters: &[&str]) -> Watcher {
        let n = WATCHERS.fetch_add(1, Ordering::Relaxed);
        let marker = format!("ems-test/marker/{n}");
        let mut o = MqttOptions::new(format!("watcher-{n}"), "127.0.0.1", broker.port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, pw)) = &broker.login {
            o.set_credentials(user.clone(), pw.clone());
        }
        let (client, mut el) = AsyncClient::new(o, 64);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let synced = Arc::new(AtomicBool::new(false));
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let (m2, s2) = (msgs.clone(), synced.clone());
        let task = tokio::spawn(async move {
            let mut subacks = 0;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        subacks = 0;
                        for f in &filters {
                            let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == filters.len() {
                            let _ = client.try_subscribe(marker.clone(), QoS::AtLeastOnce);
                        } else if subacks == filters.len() + 1 {
                            let _ =
                                client.try_publish(marker.clone(), QoS::AtLeastOnce, false, "sync");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == marker {
                            s2.store(true, Ordering::SeqCst);
                        } else {
                            m2.lock().unwrap().push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Watcher { msgs, synced, task }
    }

    /// Starts and waits until the broker's retained messages are in.
    pub(crate) async fn synced(broker: &Broker, filters: &[&str]) -> Watcher {
        let w = Watcher::start(broker, filters);
        w.wait_synced().await;
        w
    }

    pub(crate) fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Waits until `f` finds something in the messages so far.
    pub(crate) async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&[Msg]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(t) = f(&self.all()) {
                return t;
            }
            if Instant::now() > deadline {
                let dump: Vec<String> = self
                    .all()
                    .iter()
                    .map(|m| format!("{} r={} {}", m.topic, m.retain, m.text()))
                    .collect();
                panic!("timed out waiting for {what}; got:\n{}", dump.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn wait_synced(&self) {
        let deadline = Instant::now() + LONG;
        while !self.synced.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "watcher never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Watcher {
    /// Waits until the newest message on `topic` is `payload`.
    pub(crate) async fn wait_latest(&self, topic: &str, payload: &str) {
        self.wait_for(&format!("{topic} = {payload:?}"), LONG, |m| {
            m.iter()
                .rev()
                .find(|x| x.topic == topic)
                .filter(|x| x.payload == payload.as_bytes())
                .map(|_| ())
        })
        .await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the broker holds retained under `filters` now: topic → message
/// (what a fresh subscriber gets with the retain flag set).
pub(crate) async fn retained(broker: &Broker, filters: &[&str]) -> BTreeMap<String, Msg> {
    let w = Watcher::synced(broker, filters).await;
    w.all()
        .into_iter()
        .filter(|m| m.retain && !m.payload.is_empty())
        .map(|m| (m.topic.clone(), m))
        .collect()
}

/// Makes `cmd`'s process die with the thread that started it, so no broker
/// or hub outlives a failed test.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
