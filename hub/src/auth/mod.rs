//! Who may connect and for how long: the handshake rules as pure
//! functions ([`handshake`]), the token format and its hash ([`token`]),
//! and the poll that closes live device connections whose token was
//! revoked or rotated (`revocation`).

pub mod handshake;
pub(crate) mod revocation;
pub mod token;
