//! Pusher protocol 7 as types: channel names and kinds, the error-code table, client frames
//! parsed into a closed enum, server frames serialised once, and the REST bodies.
//!
//! This module does no I/O and imports no tokio, axum or opentelemetry; every parser returns
//! a typed error instead of panicking, whatever bytes it is given.

pub mod channel;
pub mod client;
mod error;
pub mod rest;
pub mod server;

pub use channel::{ChannelKind, ChannelName, ChannelType, USER_CHANNEL_PREFIX};
pub use client::{ClientEvent, PresenceMember, SigninData};
pub use error::{CloseCode, ProtocolError};

/// The highest Pusher protocol version this server speaks, and the lowest it still accepts.
pub const PROTOCOL_VERSION: u8 = 7;
pub const MIN_PROTOCOL_VERSION: u8 = 5;
