//! Channel names, validated once at the boundary into a [`ChannelName`] that carries its kind,
//! so that nothing downstream inspects name prefixes again.

use std::fmt;
use std::sync::Arc;

/// Prefix of the per-user channel that `pusher:signin` unlocks and `sendToUser` targets.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// How a channel authorises subscribers and what it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    Public,
    Private,
    Presence,
    PrivateEncrypted,
    /// `#server-to-user-{id}`: only a socket signed in as that user may subscribe.
    User,
}

/// The closed `channel_type` metric label set of the telemetry contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelType {
    Public,
    Private,
    Presence,
    PrivateEncrypted,
    Cache,
}

impl ChannelType {
    pub const ALL: [ChannelType; 5] = [
        ChannelType::Public,
        ChannelType::Private,
        ChannelType::Presence,
        ChannelType::PrivateEncrypted,
        ChannelType::Cache,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::Public => "public",
            ChannelType::Private => "private",
            ChannelType::Presence => "presence",
            ChannelType::PrivateEncrypted => "private_encrypted",
            ChannelType::Cache => "cache",
        }
    }

    /// Index into per-type arrays (attribute sets, gauges).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A validated channel name. Cloning is cheap (shared string).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelName {
    name: Arc<str>,
    kind: ChannelKind,
    cached: bool,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {0} characters")]
    TooLong(usize),
    #[error("channel name contains a character outside [A-Za-z0-9_\\-=@,.;]")]
    InvalidCharacter,
}

impl ChannelName {
    /// Validates `name` against Pusher's rules: at most `max_len` characters from
    /// `[A-Za-z0-9_\-=@,.;]`, or the `#server-to-user-{id}` form.
    pub fn parse(name: &str, max_len: usize) -> Result<Self, ChannelNameError> {
        if name.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if name.len() > max_len {
            return Err(ChannelNameError::TooLong(max_len));
        }
        let (kind, cached, checked) = if let Some(user) = name.strip_prefix(USER_CHANNEL_PREFIX) {
            if user.is_empty() {
                return Err(ChannelNameError::Empty);
            }
            (ChannelKind::User, false, user)
        } else {
            let (kind, cached) = classify(name);
            (kind, cached, name)
        };
        if !checked.bytes().all(valid_byte) {
            return Err(ChannelNameError::InvalidCharacter);
        }
        Ok(Self { name: Arc::from(name), kind, cached })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// Whether the channel keeps its last event for new subscribers (`cache-` family).
    pub fn is_cache(&self) -> bool {
        self.cached
    }

    /// Whether subscribing needs an `auth` signature.
    pub fn requires_auth(&self) -> bool {
        matches!(self.kind, ChannelKind::Private | ChannelKind::Presence | ChannelKind::PrivateEncrypted)
    }

    /// Whether `client-` events may be sent on it (Pusher: private and presence, not encrypted).
    pub fn allows_client_events(&self) -> bool {
        matches!(self.kind, ChannelKind::Private | ChannelKind::Presence)
    }

    /// The metric label of this channel.
    pub fn channel_type(&self) -> ChannelType {
        if self.cached {
            return ChannelType::Cache;
        }
        match self.kind {
            ChannelKind::Public => ChannelType::Public,
            ChannelKind::Private | ChannelKind::User => ChannelType::Private,
            ChannelKind::Presence => ChannelType::Presence,
            ChannelKind::PrivateEncrypted => ChannelType::PrivateEncrypted,
        }
    }

    /// The user id of a `#server-to-user-{id}` channel.
    pub fn user_id(&self) -> Option<&str> {
        match self.kind {
            ChannelKind::User => self.name.strip_prefix(USER_CHANNEL_PREFIX),
            _ => None,
        }
    }
}

fn classify(name: &str) -> (ChannelKind, bool) {
    if name.starts_with("private-encrypted-cache-") {
        (ChannelKind::PrivateEncrypted, true)
    } else if name.starts_with("private-encrypted-") {
        (ChannelKind::PrivateEncrypted, false)
    } else if name.starts_with("private-cache-") {
        (ChannelKind::Private, true)
    } else if name.starts_with("private-") {
        (ChannelKind::Private, false)
    } else if name.starts_with("presence-cache-") {
        (ChannelKind::Presence, true)
    } else if name.starts_with("presence-") {
        (ChannelKind::Presence, false)
    } else if name.starts_with("cache-") {
        (ChannelKind::Public, true)
    } else {
        (ChannelKind::Public, false)
    }
}

fn valid_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';')
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.name)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_types() {
        let c = |n: &str| ChannelName::parse(n, 200).unwrap();
        assert_eq!(c("news").channel_type(), ChannelType::Public);
        assert_eq!(c("private-a").kind(), ChannelKind::Private);
        assert_eq!(c("presence-a").kind(), ChannelKind::Presence);
        assert_eq!(c("private-encrypted-a").channel_type(), ChannelType::PrivateEncrypted);
        assert!(c("private-encrypted-cache-a").is_cache());
        assert_eq!(c("presence-cache-a").kind(), ChannelKind::Presence);
        assert_eq!(c("cache-a").channel_type(), ChannelType::Cache);
        assert_eq!(c("#server-to-user-42").user_id(), Some("42"));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(ChannelName::parse("", 200), Err(ChannelNameError::Empty));
        assert_eq!(ChannelName::parse("a b", 200), Err(ChannelNameError::InvalidCharacter));
        assert_eq!(ChannelName::parse("é", 200), Err(ChannelNameError::InvalidCharacter));
        assert_eq!(ChannelName::parse(&"a".repeat(201), 200), Err(ChannelNameError::TooLong(200)));
        assert_eq!(ChannelName::parse("#server-to-user-", 200), Err(ChannelNameError::Empty));
        assert_eq!(ChannelName::parse("#other", 200), Err(ChannelNameError::InvalidCharacter));
    }
}
