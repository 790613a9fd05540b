//! Connecting to the hub: TCP (with a timeout), TLS (rustls, ring provider,
//! webpki-roots plus `ca_file`) and the WebSocket handshake with
//! `Authorization: Bearer …` — the only place the token is used. 401/403
//! come back as [`ConnectError::Unauthorized`], so the link can tell "fix
//! the token" from "the network is down".

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ems_shared::MAX_MESSAGE_BYTES;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Connector, HandshakeError, WebSocket};

use crate::config::{DeviceToken, HubEndpoint};

/// The socket type of a connected link.
pub type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// Why a TLS setup failed (at startup: a configuration problem).
#[derive(Debug, Error)]
pub enum TlsError {
    /// `ca_file` could not be read or holds no certificate.
    #[error("ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the setup.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a connection attempt failed. Messages never contain the token.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// DNS resolution failed.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// Host name.
        host: String,
        /// Error.
        error: io::Error,
    },
    /// TCP connect failed on every address.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// Last address tried.
        addr: String,
        /// Error.
        error: io::Error,
    },
    /// The hub answered 401 or 403: the token is missing, wrong or revoked.
    #[error("hub refused the device token ({0}); check EMS_DEVICE_TOKEN and that the device is provisioned on the hub")]
    Unauthorized(u16),
    /// Another HTTP answer instead of 101.
    #[error("hub answered HTTP {0} instead of switching to WebSocket")]
    HttpStatus(u16),
    /// TLS or WebSocket handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The hub's TLS certificate was refused (wrong name, expired, not yet
    /// valid, unknown issuer).
    #[error("handshake failed: the hub's TLS certificate is refused ({0}); check the hub's certificate (its name must match the host in hub_url, its validity dates, its issuer in ca_file or the public roots) and this device's clock")]
    Certificate(String),
    /// The handshake took longer than the connect timeout.
    #[error("handshake timed out")]
    Timeout,
}

impl ConnectError {
    /// Retrying soon will not help (operator action needed).
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Unauthorized(_))
    }

    /// Needs an operator (or a clock sync): worth an error line every
    /// attempt.
    pub fn needs_attention(&self) -> bool {
        matches!(
            self,
            ConnectError::Unauthorized(_) | ConnectError::Certificate(_)
        )
    }
}

/// Builds the rustls client config: ring, webpki-roots, plus `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |message: String| TlsError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate found".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the link needs to connect.
#[derive(Clone)]
pub struct Target {
    /// The hub.
    pub hub: HubEndpoint,
    /// The secret.
    pub token: DeviceToken,
    /// TLS config for `wss`.
    pub tls: Arc<rustls::ClientConfig>,
    /// Handshake timeout.
    pub connect_timeout: Duration,
    /// Announced in the handshake ([`ems_shared::ACK_WINDOW_HEADER`]).
    pub ack_window: Duration,
}

/// Resolves the hub's addresses.
pub fn resolve(hub: &HubEndpoint) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = (hub.host.as_str(), hub.port)
        .to_socket_addrs()
        .map_err(|error| ConnectError::Resolve {
            host: hub.host.clone(),
            error,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::Resolve {
            host: hub.host.clone(),
            error: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        });
    }
    Ok(addrs)
}

/// One connection attempt: TCP, TLS, WebSocket handshake. Returns the
/// socket and a clone of the TCP stream (to change timeouts).
pub fn connect(target: &Target) -> Result<(Socket, TcpStream), ConnectError> {
    let tcp = tcp_connect(target)?;
    let io_err = |error: io::Error| ConnectError::Connect {
        addr: target.hub.host.clone(),
        error,
    };
    tcp.set_nodelay(true).map_err(io_err)?;
    tcp.set_read_timeout(Some(target.connect_timeout))
        .map_err(io_err)?;
    tcp.set_write_timeout(Some(target.connect_timeout))
        .map_err(io_err)?;
    let control = tcp.try_clone().map_err(io_err)?;

    let mut request = target
        .hub
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", target.token.expose()))
        .map_err(|_| ConnectError::Handshake("token is not a valid header value".into()))?;
    auth.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, auth);
    let window = target
        .ack_window
        .as_millis()
        .clamp(1, ems_shared::MAX_ACK_WINDOW_MS.into());
    request.headers_mut().insert(
        ems_shared::ACK_WINDOW_HEADER,
        HeaderValue::from(window as u64),
    );

    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let connector = if target.hub.tls {
        Connector::Rustls(target.tls.clone())
    } else {
        Connector::Plain
    };
    match tungstenite::client_tls_with_config(request, tcp, Some(ws_config), Some(connector)) {
        Ok((ws, _response)) => Ok((ws, control)),
        Err(HandshakeError::Interrupted(_)) => Err(ConnectError::Timeout),
        Err(HandshakeError::Failure(e)) => Err(classify_handshake(e)),
    }
}

/// TCP to the first of the hub's addresses that answers within the
/// connect timeout.
fn tcp_connect(target: &Target) -> Result<TcpStream, ConnectError> {
    let addrs = resolve(&target.hub)?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, target.connect_timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    match (tcp, last) {
        (Some(t), _) => Ok(t),
        (None, Some((addr, error))) => Err(ConnectError::Connect {
            addr: addr.to_string(),
            error,
        }),
        (None, None) => Err(ConnectError::Connect {
            addr: target.hub.host.clone(),
            error: io::Error::new(io::ErrorKind::NotFound, "no address"),
        }),
    }
}

fn classify_handshake(e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(resp) => {
            let s = resp.status();
            if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN {
                ConnectError::Unauthorized(s.as_u16())
            } else {
                ConnectError::HttpStatus(s.as_u16())
            }
        }
        tungstenite::Error::Io(io) if is_timeout(&io) => ConnectError::Timeout,
        tungstenite::Error::Io(io) => {
            match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(tls @ rustls::Error::InvalidCertificate(_)) => {
                    ConnectError::Certificate(tls.to_string())
                }
                _ => ConnectError::Handshake(tungstenite::Error::Io(io).to_string()),
            }
        }
        other => ConnectError::Handshake(other.to_string()),
    }
}

/// A socket read or write timed out (the stream loop polls with timeouts).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_problems_are_explained() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert!(tls_config(Some(&fixtures.join("ca.pem"))).is_ok());
        assert!(tls_config(None).is_ok());
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls_config(Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn auth_errors_are_told_apart() {
        assert!(ConnectError::Unauthorized(403).is_auth());
        assert!(!ConnectError::HttpStatus(502).is_auth());
        assert!(!ConnectError::Timeout.is_auth());
    }
}
