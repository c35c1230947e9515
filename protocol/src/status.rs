//! Instance status (the i3D numbers), runtime state (the Edgegap words) and host kind.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Instance status. The numbers are i3D's and are never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum InstanceStatus {
    /// Removed; kept for history.
    Inactive = 0,
    /// Ports reserved, build being prepared.
    Setup = 1,
    /// Deployed, process not running.
    Offline = 2,
    /// Process running, game not ready.
    Starting = 3,
    /// Ready and idle: the only allocatable status.
    Online = 4,
    /// Claimed by a matchmaker.
    Allocated = 5,
    /// Claim in progress.
    Allocating = 6,
}

impl InstanceStatus {
    pub const ALL: [Self; 7] = [
        Self::Inactive,
        Self::Setup,
        Self::Offline,
        Self::Starting,
        Self::Online,
        Self::Allocated,
        Self::Allocating,
    ];

    pub fn from_number(n: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as i64 == n)
    }

    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::Setup => "setup",
            Self::Offline => "offline",
            Self::Starting => "starting",
            Self::Online => "online",
            Self::Allocated => "allocated",
            Self::Allocating => "allocating",
        }
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.number(), self.name())
    }
}

impl Serialize for InstanceStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<'de> Deserialize<'de> for InstanceStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        Self::from_number(n).ok_or_else(|| {
            serde::de::Error::custom(format!("instance status {n} is not one of 0-6"))
        })
    }
}

/// The runtime state string beside the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeState {
    #[serde(rename = "created")]
    Created,
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "restarting")]
    Restarting,
    #[serde(rename = "exited")]
    Exited,
    #[serde(rename = "dead")]
    Dead,
    #[serde(rename = "draining")]
    Draining,
    #[serde(rename = "shuttingdown")]
    ShuttingDown,
    #[serde(rename = "server_unreachable")]
    ServerUnreachable,
}

impl RuntimeState {
    pub const ALL: [Self; 8] = [
        Self::Created,
        Self::Running,
        Self::Restarting,
        Self::Exited,
        Self::Dead,
        Self::Draining,
        Self::ShuttingDown,
        Self::ServerUnreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Exited => "exited",
            Self::Dead => "dead",
            Self::Draining => "draining",
            Self::ShuttingDown => "shuttingdown",
            Self::ServerUnreachable => "server_unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The game was told to stop (or is being removed): it takes no new match, whatever
    /// status it still reports.
    pub fn is_stopping(self) -> bool {
        matches!(self, Self::Draining | Self::ShuttingDown)
    }
}

impl fmt::Display for RuntimeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a host is: allocation prefers bare metal, and VMs are chosen only when no bare-metal
/// candidate is left (or the filter asks for `isVirtual=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostKind {
    BareMetal,
    Virtual,
}

impl HostKind {
    pub fn from_is_virtual(is_virtual: bool) -> Self {
        if is_virtual {
            Self::Virtual
        } else {
            Self::BareMetal
        }
    }

    pub fn is_virtual(self) -> bool {
        self == Self::Virtual
    }

    /// As the filter language and the i3D instance object write it: 0 or 1.
    pub fn flag(self) -> u8 {
        u8::from(self.is_virtual())
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BareMetal => "bare metal",
            Self::Virtual => "VM",
        })
    }
}

/// How a game talks to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ManagementProtocol {
    /// Arcus over the management port.
    #[default]
    Arcus,
    /// No management protocol: online when the game port accepts connections.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_stable() {
        for (n, s) in InstanceStatus::ALL.iter().enumerate() {
            assert_eq!(s.number() as usize, n);
            assert_eq!(serde_json::to_string(s).expect("ser"), n.to_string());
            assert_eq!(
                serde_json::from_str::<InstanceStatus>(&n.to_string()).expect("de"),
                *s
            );
        }
        assert!(serde_json::from_str::<InstanceStatus>("7").is_err());
    }

    #[test]
    fn state_strings() {
        for s in RuntimeState::ALL {
            let json = serde_json::to_string(&s).expect("ser");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(RuntimeState::parse(s.as_str()), Some(s));
        }
    }
}
