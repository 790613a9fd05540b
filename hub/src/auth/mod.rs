//! Who may connect and for how long: the handshake rules as pure
//! functions ([`handshake`]), the token format and its hash ([`token`]),
//! every valid token in memory (`cache`), and the poll that keeps it
//! current and closes live device connections whose token was revoked or
//! rotated (`revocation`).

pub(crate) mod cache;
pub mod handshake;
pub(crate) mod revocation;
pub mod token;
