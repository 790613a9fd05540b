//! How the bridge reaches the broker: the rumqttc options (client id,
//! credentials, last will) and the TLS set-up, and why a start can fail.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::config::{MqttConfig, MqttConfigError};
use super::discovery::{Layout, OFFLINE};

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] MqttConfigError),
    /// The CA file or TLS set-up failed.
    #[error("MQTT TLS: {0}")]
    Tls(String),
}

/// The rumqttc options: client id, credentials, last will, TLS.
pub(super) fn mqtt_options(config: &MqttConfig) -> Result<MqttOptions, MqttError> {
    let layout = Layout::new(config);
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("ems-hub-{}", layout.node));
    let mut o = MqttOptions::new(client_id, config.broker.host.clone(), config.broker.port);
    // rumqttc refuses (panics on) keep-alives under one second.
    o.set_keep_alive(config.keep_alive.max(Duration::from_secs(1)))
        .set_clean_session(true)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(
            layout.hub_availability_topic(),
            OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &config.username {
        let pw = config
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        o.set_credentials(user.clone(), pw);
    }
    if config.broker.tls {
        let tls = tls_config(config.ca_file.as_deref())?;
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
    }
    Ok(o)
}

/// rustls with the ring provider; roots: the CA file when given, else the
/// public web PKI (webpki-roots).
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, MqttError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    MqttError::Tls(format!("cannot read CA file {}: {e}", path.display()))
                })?;
            if certs.is_empty() {
                return Err(MqttError::Tls(format!(
                    "no certificate in CA file {}",
                    path.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| MqttError::Tls(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
