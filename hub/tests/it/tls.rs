//! The hub terminating TLS itself (`--tls-cert`/`--tls-key`).

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::harness::*;

fn fixture(name: &str) -> PathBuf {
    // Test-only private CA and `localhost` certificate, shared with the edge tests.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edge/tests/fixtures")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_the_hubs_own_tls() {
    let hub = TestHub::start_with(|c| {
        c.tls = Some(ems_hub::config::TlsFiles {
            cert: fixture("hub.pem"),
            key: fixture("hub.key"),
        })
    })
    .await;
    let token = hub.add_device("dev");

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the hub");
    let mut req = format!("wss://localhost:{}/ws/device/dev", hub.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    ws_send_and_ack(&mut ws).await;

    // Plain text on the TLS port is not served.
    assert!(connect(hub.addr, "/ws/device/dev", Some(&token))
        .await
        .is_err());
}

async fn ws_send_and_ack<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(reading(1, 0).into())).await.unwrap();
    loop {
        let m = tokio::time::timeout(SOON, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "ack", "{v}");
            return;
        }
    }
}
