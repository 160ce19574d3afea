//! The Pusher error-code table: every refusal the server can send on a socket, with its code,
//! its message and whether the socket is closed with that code afterwards.

use std::fmt;

/// A protocol-level refusal. The code is what the client sees in `pusher:error` and, when
/// [`ProtocolError::closes`] is true, in the WebSocket close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// 4001: no app has this key.
    AppNotFound,
    /// 4003: the app exists but is disabled.
    AppDisabled,
    /// 4004: the app is at its connection quota.
    OverQuota,
    /// 4005: a WebSocket to a path that is not `/app/{key}` (Pusher's "path not found").
    PathNotFound,
    /// 4006: the `protocol` query parameter is not a number.
    InvalidVersionFormat,
    /// 4007: a protocol version this server does not speak.
    UnsupportedProtocol,
    /// 4008: no `protocol` query parameter.
    NoProtocolVersion,
    /// 4009: the connection did not sign in within the app's user-authentication timeout.
    Unauthorized,
    /// 4009: the `Origin` header is not in the app's `allowed_origins`.
    OriginNotAllowed,
    /// 4009: the app terminated this user's connections through the API.
    Terminated,
    /// 4102: the app could not be looked up (its store is down); the client retries with
    /// backoff instead of giving up as it would on 4001.
    AppLookupFailed,
    /// 4100: the node is at `max_connections`.
    OverCapacity,
    /// 4100: the client did not read fast enough and its send queue passed its byte cap.
    SlowConsumer,
    /// 4200: the server is shutting down; reconnect (to another node) at once.
    ShuttingDown,
    /// 4201: no pong arrived within the pong timeout after our ping.
    PongTimeout,
    /// 4300: a frame that is not a valid Pusher message (bad JSON, binary, wrong types, ...).
    InvalidMessage(String),
    /// 4300: a message over the soft size limit; the socket stays open.
    MessageTooLarge { limit_bytes: usize },
    /// 4301: a client event that was refused (rate limit, size, name, channel, app setting).
    ClientEventRejected(String),
    /// 4302: a subscribe/unsubscribe/sign-in that could not be carried out.
    SubscriptionRejected(String),
}

impl ProtocolError {
    /// The Pusher error code sent in `pusher:error`.
    pub fn code(&self) -> u16 {
        match self {
            Self::AppNotFound => 4001,
            Self::AppDisabled => 4003,
            Self::OverQuota => 4004,
            Self::PathNotFound => 4005,
            Self::InvalidVersionFormat => 4006,
            Self::UnsupportedProtocol => 4007,
            Self::NoProtocolVersion => 4008,
            Self::Unauthorized | Self::Terminated | Self::OriginNotAllowed => 4009,
            Self::OverCapacity => 4100,
            Self::AppLookupFailed => 4102,
            Self::SlowConsumer => 4100,
            Self::ShuttingDown => 4200,
            Self::PongTimeout => 4201,
            Self::InvalidMessage(_) => 4300,
            Self::MessageTooLarge { .. } => 4300,
            Self::ClientEventRejected(_) => 4301,
            Self::SubscriptionRejected(_) => 4302,
        }
    }

    /// Whether the socket is closed (with [`ProtocolError::code`]) after the error frame.
    pub fn closes(&self) -> bool {
        match self {
            Self::AppNotFound
            | Self::AppDisabled
            | Self::OverQuota
            | Self::PathNotFound
            | Self::InvalidVersionFormat
            | Self::UnsupportedProtocol
            | Self::NoProtocolVersion
            | Self::Unauthorized
            | Self::Terminated
            | Self::OriginNotAllowed
            | Self::OverCapacity
            | Self::AppLookupFailed
            | Self::SlowConsumer
            | Self::ShuttingDown
            | Self::PongTimeout => true,
            Self::InvalidMessage(_)
            | Self::MessageTooLarge { .. }
            | Self::ClientEventRejected(_)
            | Self::SubscriptionRejected(_) => false,
        }
    }

    /// The `error_type` label of `connection_errors_total` this refusal counts under, if any.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            Self::AppNotFound => Some("app_not_found"),
            Self::OriginNotAllowed => Some("origin_not_allowed"),
            Self::AppDisabled => Some("app_disabled"),
            Self::OverQuota => Some("over_quota"),
            Self::OverCapacity => Some("over_capacity"),
            Self::SlowConsumer => Some("slow_consumer"),
            Self::PongTimeout => Some("pong_timeout"),
            Self::Unauthorized => Some("auth_timeout"),
            Self::PathNotFound
            | Self::InvalidVersionFormat
            | Self::UnsupportedProtocol
            | Self::NoProtocolVersion
            | Self::InvalidMessage(_) => Some("invalid_message"),
            Self::MessageTooLarge { .. } => Some("message_too_large"),
            Self::ShuttingDown
            | Self::Terminated
            | Self::AppLookupFailed
            | Self::ClientEventRejected(_)
            | Self::SubscriptionRejected(_) => None,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AppNotFound => f.write_str("Application does not exist"),
            Self::AppDisabled => f.write_str("Application disabled"),
            Self::OverQuota => f.write_str("Application is over connection quota"),
            Self::OriginNotAllowed => f.write_str("Origin not allowed for this app"),
            Self::PathNotFound => f.write_str("Path not found"),
            Self::InvalidVersionFormat => f.write_str("Invalid version string format"),
            Self::UnsupportedProtocol => f.write_str("Unsupported protocol version"),
            Self::NoProtocolVersion => f.write_str("No protocol version supplied"),
            Self::Unauthorized => f.write_str("Connection is unauthorized: sign-in timed out"),
            Self::Terminated => f.write_str("Connection terminated by the app"),
            Self::AppLookupFailed => f.write_str("App lookup failed; try again later"),
            Self::OverCapacity => f.write_str("Over capacity: server at max connections"),
            Self::SlowConsumer => f.write_str("Client too slow: send queue over its limit"),
            Self::ShuttingDown => f.write_str("Server shutting down; reconnect"),
            Self::PongTimeout => f.write_str("Pong reply not received in time"),
            Self::InvalidMessage(why) => write!(f, "Invalid message: {why}"),
            Self::MessageTooLarge { limit_bytes } => {
                write!(f, "Message too large: the limit is {limit_bytes} bytes")
            }
            Self::ClientEventRejected(why) => write!(f, "Client event rejected: {why}"),
            Self::SubscriptionRejected(why) => write!(f, "Request rejected: {why}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// WebSocket close codes used outside the Pusher table.
pub struct CloseCode;

impl CloseCode {
    /// RFC 6455 "message too big": only for frames past the hard limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// RFC 6455 normal closure.
    pub const NORMAL: u16 = 1000;
}
