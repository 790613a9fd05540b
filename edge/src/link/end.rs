//! How a CONNECTED period of the link ends: what the session loop and the
//! send routine report, and what the RETRYING state backs off on.

/// How a CONNECTED period ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We closed with 1001 because of shutdown.
    Shutdown,
    /// Close code 4000: another connection with our device id took over.
    Replaced,
    /// Close code 4001: the token was revoked or rotated.
    Revoked,
    /// Close code 4002: the hub refuses this device id for a cool-down
    /// (it kept replacing its own connections).
    Conflict,
    /// The hub closed (code, if any) or the socket failed.
    Lost(String),
}
