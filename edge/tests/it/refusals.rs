//! The hub says no: a wrong token, a takeover by a clone (close 4000), a
//! reading rejected for good. The edge keeps running and loses nothing
//! else.

use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;

#[test]
fn forbidden_token_keeps_retrying_without_crashing() {
    let w = World::new();
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    // The last character replaced by another one (the same one, as it may
    // already be, would leave the token valid).
    let (head, last) = w.token.split_at(w.token.len() - 1);
    let wrong = format!("{head}{}", if last == "x" { "y" } else { "x" });
    assert_ne!(wrong, w.token);
    let mut edge = Edge::spawn(&config, &wrong, w.dir.path());
    wait_for("three refused attempts", SOON, || {
        edge.count_in_log("hub refused the device token (403)") >= 3
    });
    assert!(edge.alive(), "the edge must keep retrying");
    assert_eq!(w.count(), 0);
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();
}

#[test]
fn takeover_close_4000_is_reported_and_retried() {
    let w = World::new();
    let _hub = w.hub();
    // Slow backoff at the cap so the test client keeps the slot a moment.
    let mut edge = w.edge(&w.config("edge.toml", "", ""));
    wait_for("edge connected", SOON, || w.count() >= 5);
    // A "cloned SD card": same device id and token.
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://127.0.0.1:{}/ws/device/{DEVICE}",
        w.port
    ))
    .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", w.token).parse().unwrap(),
    );
    let tcp = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    let (mut clone, _) = tungstenite::client(req, tcp).unwrap();
    wait_for("the 4000 log line", SOON, || {
        edge.log()
            .contains("replaced by another connection with the same device id (cloned SD card?)")
    });
    assert!(edge.alive());
    // The edge comes back (and in turn replaces the clone).
    let n = w.count();
    wait_for("streaming again", SOON, || w.count() > n + 10);
    let _ = clone.close(None);
    edge.terminate();
    edge.assert_token_not_logged();
}

#[test]
fn a_rejected_reading_leaves_the_outbox_without_blocking_it() {
    use ems_edge::outbox::Outbox;
    const OLD_EPOCH: u64 = 44;
    let w = World::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut ob = Outbox::open(&w.spool_dir(), 256 << 20, 512).unwrap();
    for (seq, ts) in [
        (0, now_ms - 2000),
        (1, now_ms + 3_600_000),
        (2, now_ms - 1000),
    ] {
        let r = ems_shared::Reading {
            epoch: OLD_EPOCH,
            seq,
            ts_ms: ts,
            meter: "main".into(),
            power_w: Some(100.0),
            ..Default::default()
        };
        ob.append(&r);
    }
    ob.sync_now().spool.unwrap();
    drop(ob);
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let mut edge = w.edge(&config);
    wait_for("the valid readings stored", SOON, || {
        w.seqs_of(OLD_EPOCH) == [0, 2]
    });
    wait_for("the rejection logged", SOON, || {
        edge.log()
            .contains("hub rejected reading epoch 44 seq 1: future_timestamp")
    });
    edge.terminate();
    // The hub's count of future-dated readings it refused.
    let refused = || {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let series = "ems_readings_rejected_total{reason=\"future_timestamp\"} ";
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series}in\n{text}"))
    };
    assert_eq!(refused(), 1.0);
    // The next start does not send it again. The spool sends in order, so
    // once a reading sampled by the new process is stored, a resend of the
    // refused one would already have been refused again.
    let mut again = w.edge(&config);
    let epoch = again.epoch();
    wait_for("a reading of the new process stored", SOON, || {
        !w.seqs_of(epoch).is_empty()
    });
    assert_eq!(refused(), 1.0, "the refused reading was sent again");
    assert!(!again.log().contains("hub rejected"), "{}", again.log());
    again.terminate();
    edge.assert_token_not_logged();
    again.assert_token_not_logged();
}

/// A hub-like peer that takes the connection, waits for a reading (acking
/// nothing, so the edge sits in a read while new readings become ready),
/// then closes with `code` and resets the TCP connection while the edge
/// still has readings to write.
fn close_then_reset(listener: &std::net::TcpListener, code: u16) {
    use std::os::fd::AsRawFd;
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;
    let deadline = std::time::Instant::now() + SOON;
    let tcp = loop {
        match listener.accept() {
            Ok((tcp, _)) => break tcp,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the edge did not connect"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(SOON)).unwrap();
    let mut ws = tungstenite::accept(tcp).unwrap();
    loop {
        let msg = ws.read().unwrap();
        if msg
            .to_text()
            .is_ok_and(|t| t.contains("\"type\":\"reading\""))
        {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    ws.close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "scripted".into(),
    }))
    .unwrap();
    let _ = ws.flush();
    std::thread::sleep(Duration::from_millis(300));
    // RST instead of FIN: whatever the edge writes next fails.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let tcp = ws.get_ref();
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(ws);
}

#[test]
fn close_4001_and_4002_are_acted_on_even_when_the_socket_then_fails() {
    let w = World::new();
    // The edge sleeps in poll while the peer is silent, and has readings
    // ready to write when the close comes.
    let config = w.config("edge.toml", "", "");
    let listener = std::net::TcpListener::bind(("127.0.0.1", w.port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut edge = w.edge(&config);
    let ended = |edge: &Edge| {
        edge.count_in_log("RETRYING in")
            + edge.count_in_log("the hub closed this link with code")
            + edge.count_in_log("refuses this device id for a while")
    };
    for (i, code) in [4001, 4002, 4001].into_iter().enumerate() {
        close_then_reset(&listener, code);
        let deadline = std::time::Instant::now() + SOON;
        while ended(&edge) <= i {
            assert!(
                std::time::Instant::now() < deadline,
                "session {i} did not end:\n{}",
                edge.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let log = edge.log();
    assert!(
        !log.contains("link lost after"),
        "a closed-with-4001/4002 link was treated as a plain lost link:\n{log}"
    );
    assert_eq!(
        log.matches("the device token was revoked or rotated")
            .count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("refuses this device id for a while (code 4002)"),
        "{log}"
    );
    assert!(edge.alive());
    edge.terminate();
    edge.assert_token_not_logged();
}
