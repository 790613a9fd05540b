//! `wss://` through a TLS terminator with a private CA, and the refusal
//! without it.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// A TLS terminator in front of the hub: rustls server with the fixture
/// certificate (`localhost`, signed by `fixtures/ca.pem`), bytes pumped
/// to the hub's plain port. Serves connections until the test ends.
fn tls_proxy(backend_port: u16) -> u16 {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    tls_proxy_with(
        &fs::read_to_string(fixtures.join("hub.pem")).unwrap(),
        &fs::read_to_string(fixtures.join("hub.key")).unwrap(),
        backend_port,
    )
}

/// [`tls_proxy`] with the given certificate chain and key (PEM).
fn tls_proxy_with(cert_pem: &str, key_pem: &str, backend_port: u16) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::{ErrorKind, Read, Write};

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(front) = conn else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(back) = TcpStream::connect(("127.0.0.1", backend_port)) else {
                    return;
                };
                let t = Some(Duration::from_millis(5));
                front.set_read_timeout(t).unwrap();
                back.set_read_timeout(t).unwrap();
                let mut back = back;
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, front);
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if back.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                    match back.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    port
}

#[test]
fn streams_over_tls_with_a_private_ca() {
    let w = World::new();
    let _hub = w.hub();
    let proxy = tls_proxy(w.port);
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.pem");
    let config = w.config("edge.toml", "", "");
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!(
            "hub_url = \"ws://127.0.0.1:{}\"\nallow_insecure = true",
            w.port
        ),
        &format!(
            "hub_url = \"wss://localhost:{proxy}\"\nca_file = \"{}\"",
            ca.display()
        ),
    );
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for("readings over wss", SOON, || w.count() >= 10);
    let log = edge.log();
    assert!(
        log.contains(&format!(
            "CONNECTED to wss://localhost:{proxy}/ws/device/{DEVICE}"
        )),
        "{log}"
    );
    assert!(!log.contains("unencrypted"));
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();

    // Without the private CA the hub's certificate is refused, and the
    // edge keeps retrying.
    let text = fs::read_to_string(&config).unwrap();
    let no_ca: String = text
        .lines()
        .filter(|l| !l.starts_with("ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&config, no_ca).unwrap();
    let mut edge = w.edge(&config);
    wait_for("certificate refusals", SOON, || {
        edge.count_in_log("handshake failed") >= 2
    });
    assert!(edge.log().contains("UnknownIssuer"), "{}", edge.log());
    assert!(edge.alive());
    edge.terminate();
    edge.assert_token_not_logged();
}

/// A private CA and a hub certificate it signed, for `names`, valid
/// between the two dates: (CA PEM, certificate PEM, key PEM).
fn issue(names: &[&str], not_before: (i32, u8), not_after: (i32, u8)) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "EMS test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, 1);
    leaf.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, 1);
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// The edge, pointed at a TLS terminator with the hub certificate
/// `(ca, cert, key)`, must refuse it, keep retrying, say why, and never
/// show the token.
fn refuses(w: &World, name: &str, (ca, cert, key): (String, String, String), reason: &str) {
    let proxy = tls_proxy_with(&cert, &key, w.port);
    let ca_path = w.dir.path().join(format!("{name}-ca.pem"));
    fs::write(&ca_path, ca).unwrap();
    let config = w.config(&format!("{name}.toml"), "", "");
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!(
            "hub_url = \"ws://127.0.0.1:{}\"\nallow_insecure = true",
            w.port
        ),
        &format!(
            "hub_url = \"wss://localhost:{proxy}\"\nca_file = \"{}\"",
            ca_path.display()
        ),
    );
    fs::write(&config, text).unwrap();
    let mut edge = w.edge(&config);
    wait_for(&format!("{name}: refused three times"), SOON, || {
        edge.count_in_log("handshake failed") >= 3
    });
    let log = edge.log();
    assert!(log.contains(reason), "{name}: no {reason:?} in\n{log}");
    assert!(
        log.contains("check the hub's certificate"),
        "{name}: no hint in\n{log}"
    );
    assert!(edge.alive(), "{name}: the edge must keep retrying");
    assert_eq!(w.count(), 0);
    let (status, _) = edge.terminate();
    assert!(status.success());
    edge.assert_token_not_logged();
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let w = World::new();
    let _hub = w.hub();
    refuses(
        &w,
        "mismatch",
        issue(&["hub.example.org"], (2020, 1), (2120, 1)),
        "not valid for name",
    );
}

#[test]
fn an_expired_or_not_yet_valid_certificate_is_refused() {
    let w = World::new();
    let _hub = w.hub();
    refuses(
        &w,
        "expired",
        issue(&["localhost"], (2020, 1), (2021, 1)),
        "expired",
    );
    refuses(
        &w,
        "not-yet-valid",
        issue(&["localhost"], (2100, 1), (2101, 1)),
        "not valid yet",
    );
}
