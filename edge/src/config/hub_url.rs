//! `hub_url`: where the hub is. Only scheme, host and port are accepted;
//! the edge adds the device path itself, so a URL can never carry a token
//! or point at another device's stream.

/// Where the hub is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    /// TLS (`wss`) or not (`ws`, only with `allow_insecure`).
    pub tls: bool,
    /// Host name or IP literal (brackets stripped).
    pub host: String,
    /// Port (default 443 / 80).
    pub port: u16,
    /// The full URL including `/ws/device/{device_id}`.
    pub url: String,
}

/// Parses `wss://host[:port]` (a trailing `/` is allowed, nothing else after
/// the authority) and appends `/ws/device/{device_id}`.
pub fn parse_hub_url(
    url: &str,
    device_id: &str,
    allow_insecure: bool,
) -> Result<HubEndpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://") {
        if !allow_insecure {
            return Err(
                "ws:// sends readings unencrypted; use wss:// or set allow_insecure = true".into(),
            );
        }
        (false, r)
    } else {
        return Err("must start with wss:// (or ws:// with allow_insecure = true)".into());
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains(['/', '?', '#', '@']) || authority.contains(char::is_whitespace) {
        return Err(
            "give only scheme, host and port (the edge adds /ws/device/{device_id}; no query, no credentials)"
                .into(),
        );
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated [ in host")?;
        let port = match after {
            "" => default_port,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or("bad port")?,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| "bad port")?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err("no host or port 0".into());
    }
    let scheme = if tls { "wss" } else { "ws" };
    let host_part = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    Ok(HubEndpoint {
        tls,
        url: format!("{scheme}://{host_part}:{port}/ws/device/{device_id}"),
        host,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_url_forms() {
        let p = |u| parse_hub_url(u, "d", true);
        assert_eq!(p("wss://h:8443/").unwrap().port, 8443);
        assert_eq!(
            p("wss://[::1]:9000").unwrap().url,
            "wss://[::1]:9000/ws/device/d"
        );
        assert_eq!(p("wss://[::1]").unwrap().host, "::1");
        assert!(p("wss://h/ws/device/d").is_err());
        assert!(p("wss://h?token=x").is_err());
        assert!(p("wss://user:pw@h").is_err());
        assert!(p("https://h").is_err());
        assert!(p("wss://h:notaport").is_err());
        assert!(p("wss://").is_err());
    }
}
