//! The one error shape of ERRORS.md and every code in it.
//!
//! Each code carries its HTTP status, its 76000-series number where it has one, and the text
//! `berthctl explain` prints, so the table lives in exactly one place.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Every code of ERRORS.md. The string form is stable and never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AgentInternalError,
    AgentUnauthenticated,
    AgentServerError,
    InstanceNotOnHost,
    InstanceNotAllocatable,
    InstanceAllocating,
    InstanceAlreadyAllocated,
    AllocationTimedOut,
    AgentUnreachable,
    MissingCredentials,
    InvalidCredentials,
    InvalidFilterSyntax,
    InvalidFilterColumn,
    UnsupportedFilterColumn,
    InvalidRequest,
    ApplicationNotFound,
    FilterValueNotFound,
    NoAllocatableInstance,
    ResourceNotFound,
    IdempotencyKeyReused,
    PayloadTooLarge,
    RateLimited,
    InternalError,
    ServiceUnavailable,
}

/// What `berthctl explain` prints for a code.
#[derive(Debug, Clone, Copy)]
pub struct Explanation {
    pub meaning: &'static str,
    pub causes: &'static [&'static str],
    pub checks: &'static [&'static str],
}

impl ErrorCode {
    pub const ALL: [Self; 24] = [
        Self::AgentInternalError,
        Self::AgentUnauthenticated,
        Self::AgentServerError,
        Self::InstanceNotOnHost,
        Self::InstanceNotAllocatable,
        Self::InstanceAllocating,
        Self::InstanceAlreadyAllocated,
        Self::AllocationTimedOut,
        Self::AgentUnreachable,
        Self::MissingCredentials,
        Self::InvalidCredentials,
        Self::InvalidFilterSyntax,
        Self::InvalidFilterColumn,
        Self::UnsupportedFilterColumn,
        Self::InvalidRequest,
        Self::ApplicationNotFound,
        Self::FilterValueNotFound,
        Self::NoAllocatableInstance,
        Self::ResourceNotFound,
        Self::IdempotencyKeyReused,
        Self::PayloadTooLarge,
        Self::RateLimited,
        Self::InternalError,
        Self::ServiceUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentInternalError => "AGENT_INTERNAL_ERROR",
            Self::AgentUnauthenticated => "AGENT_UNAUTHENTICATED",
            Self::AgentServerError => "AGENT_SERVER_ERROR",
            Self::InstanceNotOnHost => "INSTANCE_NOT_ON_HOST",
            Self::InstanceNotAllocatable => "INSTANCE_NOT_ALLOCATABLE",
            Self::InstanceAllocating => "INSTANCE_ALLOCATING",
            Self::InstanceAlreadyAllocated => "INSTANCE_ALREADY_ALLOCATED",
            Self::AllocationTimedOut => "ALLOCATION_TIMED_OUT",
            Self::AgentUnreachable => "AGENT_UNREACHABLE",
            Self::MissingCredentials => "MISSING_CREDENTIALS",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::InvalidFilterSyntax => "INVALID_FILTER_SYNTAX",
            Self::InvalidFilterColumn => "INVALID_FILTER_COLUMN",
            Self::UnsupportedFilterColumn => "UNSUPPORTED_FILTER_COLUMN",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::ApplicationNotFound => "APPLICATION_NOT_FOUND",
            Self::FilterValueNotFound => "FILTER_VALUE_NOT_FOUND",
            Self::NoAllocatableInstance => "NO_ALLOCATABLE_INSTANCE",
            Self::ResourceNotFound => "RESOURCE_NOT_FOUND",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::RateLimited => "RATE_LIMITED",
            Self::InternalError => "INTERNAL_ERROR",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }

    /// The codes carrying this 76000-series number (76007 has two).
    pub fn from_agent_code(n: u32) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|c| c.agent_code() == Some(n))
            .collect()
    }

    /// The HTTP status ERRORS.md documents for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::AgentInternalError => 500,
            Self::AgentUnauthenticated => 403,
            Self::AgentServerError => 422,
            Self::InstanceNotOnHost => 404,
            Self::InstanceNotAllocatable => 404,
            Self::InstanceAllocating => 422,
            Self::InstanceAlreadyAllocated => 422,
            Self::AllocationTimedOut => 422,
            Self::AgentUnreachable => 504,
            Self::MissingCredentials => 401,
            Self::InvalidCredentials => 403,
            Self::InvalidFilterSyntax
            | Self::InvalidFilterColumn
            | Self::UnsupportedFilterColumn
            | Self::InvalidRequest => 400,
            Self::ApplicationNotFound
            | Self::FilterValueNotFound
            | Self::NoAllocatableInstance
            | Self::ResourceNotFound => 404,
            Self::IdempotencyKeyReused => 409,
            Self::PayloadTooLarge => 413,
            Self::RateLimited => 429,
            Self::InternalError => 500,
            Self::ServiceUnavailable => 503,
        }
    }

    /// The 76000-series number, for codes caused by a host agent.
    pub fn agent_code(self) -> Option<u32> {
        Some(match self {
            Self::AgentInternalError => 76000,
            Self::AgentUnauthenticated => 76001,
            Self::AgentServerError => 76002,
            Self::InstanceNotOnHost => 76003,
            Self::InstanceNotAllocatable => 76004,
            Self::InstanceAllocating => 76005,
            Self::InstanceAlreadyAllocated => 76006,
            Self::AllocationTimedOut | Self::AgentUnreachable => 76007,
            _ => return None,
        })
    }

    /// Whether an agent answering with this code says something about the one instance asked
    /// for (so the next candidate may do better), rather than about the request or the agent.
    pub fn is_per_instance(self) -> bool {
        matches!(
            self,
            Self::InstanceNotOnHost
                | Self::InstanceNotAllocatable
                | Self::InstanceAllocating
                | Self::InstanceAlreadyAllocated
                | Self::AllocationTimedOut
                | Self::AgentUnreachable
                | Self::AgentInternalError
                | Self::AgentServerError
                | Self::AgentUnauthenticated
        )
    }

    pub fn explain(self) -> Explanation {
        match self {
            Self::AgentInternalError => Explanation {
                meaning: "The host agent returned an unexpected response: the controller could not understand its answer.",
                causes: &[
                    "agent and controller versions that do not speak the same API",
                    "a proxy or load balancer between them answering in the agent's place",
                    "the agent crashed mid-answer",
                ],
                checks: &[
                    "`berthctl hosts` for the host's agent version",
                    "the agent's log (journalctl -u berth-agent) for the identifier",
                    "that advertise_url in agent.toml points at the agent itself",
                ],
            },
            Self::AgentUnauthenticated => Explanation {
                meaning: "The token presented to the host agent is invalid (HTTP 403).",
                causes: &[
                    "the agent re-registered and the controller still uses the old host token",
                    "a manual call to the agent with a wrong token",
                ],
                checks: &[
                    "the agent's log for 'registered' lines and the host id it received",
                    "restart the agent to force a fresh registration",
                ],
            },
            Self::AgentServerError => Explanation {
                meaning: "The host agent hit an unspecified internal error (HTTP 422).",
                causes: &[
                    "the agent could not spawn or signal a process (permissions, missing executable)",
                    "the agent's state directory is not writable",
                    "no free port left in game_ports or management_ports",
                ],
                checks: &[
                    "the agent's log for the identifier",
                    "`berthctl instances` for instances stuck in status 1 or 2",
                    "free space and permissions of state_dir",
                ],
            },
            Self::InstanceNotOnHost => Explanation {
                meaning: "The chosen application instance no longer exists on the host, so it cannot be allocated (HTTP 404).",
                causes: &[
                    "the instance was removed (scale-down, drain, manual delete) after the controller chose it",
                    "the agent lost its state directory and no longer knows the instance",
                ],
                checks: &[
                    "`berthctl instances --all` for the instance's history",
                    "the agent's state_dir and its log at start-up",
                ],
            },
            Self::InstanceNotAllocatable => Explanation {
                meaning: "The instance exists on the host but is not in an allocatable state: it is not online (HTTP 404).",
                causes: &[
                    "the game server stopped reporting status 4, crashed or is restarting",
                    "the Arcus link between the agent and the game is down",
                    "the controller's view was older than the agent's",
                ],
                checks: &[
                    "`berthctl instances` for the instance's status, state and Arcus link",
                    "the instance's log: GET /v1/instances/{id}/logs on the agent",
                ],
            },
            Self::InstanceAllocating => Explanation {
                meaning: "The instance is already being allocated; it cannot be allocated again (HTTP 422).",
                causes: &[
                    "two allocation requests raced for the same instance (another controller replica, or a manual agent call)",
                    "an earlier allocation is still waiting for the game to confirm (confirmAllocation)",
                ],
                checks: &[
                    "the controller retries the next candidate by itself; repeated errors mean too few idle instances",
                    "`berthctl errors show IDENTIFIER` for every attempt",
                ],
            },
            Self::InstanceAlreadyAllocated => Explanation {
                meaning: "The instance is already allocated; it cannot be allocated again (HTTP 422).",
                causes: &[
                    "the controller's view lagged the agent's (the game reported status 5 itself)",
                    "an allocation the controller lost track of, reconciled at the next agent report",
                ],
                checks: &[
                    "`berthctl instances` for the instance's allocation",
                    "`berthctl errors show IDENTIFIER` for every attempt",
                ],
            },
            Self::AllocationTimedOut => Explanation {
                meaning: "The allocation on the host was aborted or did not finish within 5 s (HTTP 422).",
                causes: &[
                    "confirmAllocation is set and the game did not report status 5 in time",
                    "the game is not reading its Arcus link (stuck main loop)",
                ],
                checks: &[
                    "the instance's log around the time of the request",
                    "the application's confirmAllocation setting",
                    "Arcus link state in `berthctl instances`",
                ],
            },
            Self::AgentUnreachable => Explanation {
                meaning: "The host agent could not be reached or did not answer in time (HTTP 504).",
                causes: &[
                    "the host is down, partitioned or overloaded",
                    "a firewall blocks TCP 6824 from the controller",
                    "the agent is restarting",
                ],
                checks: &[
                    "`berthctl hosts` for the host's state and last heartbeat; `not_answering` means its agent heartbeats but the controller cannot call it (`berthctl hosts show` says why)",
                    "curl http://HOST:6824/healthz from the controller machine",
                    "systemctl status berth-agent on the host",
                ],
            },
            Self::MissingCredentials => Explanation {
                meaning: "The request had no Authorization header (HTTP 401).",
                causes: &["the client did not send `Authorization: Bearer <token>`"],
                checks: &[
                    "the client's configuration; berthctl reads --token, BERTH_TOKEN or its config file",
                ],
            },
            Self::InvalidCredentials => Explanation {
                meaning: "The token is unknown, revoked, or its role may not call this route (HTTP 403).",
                causes: &[
                    "a typo or an old token",
                    "a matchmaker token used on an admin route",
                    "a host token used for another host",
                ],
                checks: &["the [[tokens]] entries in controller.toml and their roles"],
            },
            Self::InvalidFilterSyntax => Explanation {
                meaning: "The filter expression does not parse; the details say where (HTTP 400).",
                causes: &[
                    "a condition without `=`",
                    "conditions joined by something other than `and`",
                    "an unterminated quote",
                ],
                checks: &["the filter: `column=value and column=value`, values optionally quoted"],
            },
            Self::InvalidFilterColumn => Explanation {
                meaning: "The filter names a column that does not exist (HTTP 400).",
                causes: &["a typo in the column name"],
                checks: &[
                    "valid columns: deploymentEnvironmentId, deploymentEnvironmentName, fleetId, fleetName, regionId, regionName, dcLocationId, dcLocationName, isVirtual",
                ],
            },
            Self::UnsupportedFilterColumn => Explanation {
                meaning: "The filter names a known instance field that cannot be filtered on (HTTP 400).",
                causes: &[
                    "filtering on status, pid, numPlayers, metadata and similar instance fields is not supported, as on i3D",
                ],
                checks: &[
                    "filter on fleet, region, DC location, deployment environment or isVirtual instead",
                ],
            },
            Self::InvalidRequest => Explanation {
                meaning: "A body or parameter does not fit; the details name the field and why (HTTP 400).",
                causes: &[
                    "malformed JSON or a wrong type",
                    "metadata over the limits (64 pairs, keys 64 bytes, values 2 KiB)",
                    "an unknown field in a strict body",
                ],
                checks: &["the request body against DESIGN.md §4"],
            },
            Self::ApplicationNotFound => Explanation {
                meaning: "The applicationId in the path names no application (HTTP 404).",
                causes: &["a wrong id, or the application was never created"],
                checks: &["`berthctl apply -f` the application, or GET /v1/applications"],
            },
            Self::FilterValueNotFound => Explanation {
                meaning: "A filter value names no entity, e.g. regionName=mars-1; the details name the filter (HTTP 404).",
                causes: &["a typo in a region, fleet, DC location or environment name or id"],
                checks: &["GET /v1/regions, /v1/fleets for the valid values"],
            },
            Self::NoAllocatableInstance => Explanation {
                meaning: "Nothing could be allocated; the details say which filter or condition removed the candidates (HTTP 404).",
                causes: &[
                    "every matching instance is allocated (capacity too low)",
                    "matching hosts are unreachable or draining",
                    "game servers never reached status 4 (crash loop, Arcus not implemented)",
                ],
                checks: &[
                    "the details: counts per status and per condition",
                    "`berthctl instances --filter ...` with the same filter",
                    "the fleet's instancesPerHost",
                ],
            },
            Self::ResourceNotFound => Explanation {
                meaning: "An instance, host, build, profile, fleet or error record that does not exist (HTTP 404).",
                causes: &[
                    "a wrong id",
                    "an error record older than the retention window",
                ],
                checks: &["the listing routes for valid ids"],
            },
            Self::IdempotencyKeyReused => Explanation {
                meaning: "The Idempotency-Key was used before for a different request (HTTP 409).",
                causes: &["a matchmaker reusing keys across different matches"],
                checks: &[
                    "generate one key per logical allocation; retries of the same request may reuse it",
                ],
            },
            Self::PayloadTooLarge => Explanation {
                meaning: "The request body is over the size limit (HTTP 413).",
                causes: &["oversized metadata or a wrong file sent as body"],
                checks: &["metadata limits: 64 pairs, keys 64 bytes, values 2 KiB"],
            },
            Self::RateLimited => Explanation {
                meaning: "Too many requests for this token; retry after the Retry-After header (HTTP 429).",
                causes: &["a client retrying in a tight loop"],
                checks: &["add backoff; one token per matchmaker"],
            },
            Self::InternalError => Explanation {
                meaning: "A bug or an unavailable store; logged with the identifier (HTTP 500).",
                causes: &["a Berth bug", "a full disk or a locked database file"],
                checks: &[
                    "the daemon's log for the identifier",
                    "free space in the data directory",
                ],
            },
            Self::ServiceUnavailable => Explanation {
                meaning: "The daemon is shutting down or its store is unreachable (HTTP 503).",
                causes: &["a restart in progress", "the database is unreachable"],
                checks: &["GET /readyz", "systemctl status berth-controller"],
            },
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s}")))
    }
}

/// One candidate tried during an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub instance_id: String,
    pub host_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    pub status_code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The JSON error body of every route of both daemons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub status_code: u16,
    pub code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    pub message: String,
    pub details: String,
    pub identifier: String,
    pub path: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<Attempt>>,
}

impl ErrorBody {
    /// A body for `code` with the code's own status and agent number.
    pub fn new(
        code: ErrorCode,
        message: impl Into<String>,
        details: impl Into<String>,
        identifier: impl Into<String>,
        path: impl Into<String>,
        timestamp: impl Into<String>,
    ) -> Self {
        Self {
            status_code: code.http_status(),
            code,
            error_code: code.agent_code(),
            message: message.into(),
            details: details.into(),
            identifier: identifier.into(),
            path: path.into(),
            timestamp: timestamp.into(),
            attempts: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_errors_md() {
        let expect = [
            ("AGENT_INTERNAL_ERROR", Some(76000), 500),
            ("AGENT_UNAUTHENTICATED", Some(76001), 403),
            ("AGENT_SERVER_ERROR", Some(76002), 422),
            ("INSTANCE_NOT_ON_HOST", Some(76003), 404),
            ("INSTANCE_NOT_ALLOCATABLE", Some(76004), 404),
            ("INSTANCE_ALLOCATING", Some(76005), 422),
            ("INSTANCE_ALREADY_ALLOCATED", Some(76006), 422),
            ("ALLOCATION_TIMED_OUT", Some(76007), 422),
            ("AGENT_UNREACHABLE", Some(76007), 504),
            ("MISSING_CREDENTIALS", None, 401),
            ("INVALID_CREDENTIALS", None, 403),
            ("INVALID_FILTER_SYNTAX", None, 400),
            ("INVALID_FILTER_COLUMN", None, 400),
            ("UNSUPPORTED_FILTER_COLUMN", None, 400),
            ("INVALID_REQUEST", None, 400),
            ("APPLICATION_NOT_FOUND", None, 404),
            ("FILTER_VALUE_NOT_FOUND", None, 404),
            ("NO_ALLOCATABLE_INSTANCE", None, 404),
            ("RESOURCE_NOT_FOUND", None, 404),
            ("IDEMPOTENCY_KEY_REUSED", None, 409),
            ("PAYLOAD_TOO_LARGE", None, 413),
            ("RATE_LIMITED", None, 429),
            ("INTERNAL_ERROR", None, 500),
            ("SERVICE_UNAVAILABLE", None, 503),
        ];
        assert_eq!(expect.len(), ErrorCode::ALL.len());
        for (code, (name, num, status)) in ErrorCode::ALL.iter().zip(expect) {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.agent_code(), num, "{name}");
            assert_eq!(code.http_status(), status, "{name}");
            assert_eq!(ErrorCode::parse(name), Some(*code));
            let e = code.explain();
            assert!(!e.meaning.is_empty() && !e.causes.is_empty() && !e.checks.is_empty());
        }
        assert_eq!(ErrorCode::from_agent_code(76007).len(), 2);
    }

    #[test]
    fn body_shape() {
        let body = ErrorBody::new(
            ErrorCode::InstanceAlreadyAllocated,
            "Unable to allocate application instance.",
            "already allocated",
            "3bc545b7-4750-47e6-a918-c93debc58663",
            "/v1/instances/x/allocate",
            "2026-11-22T07:51:49Z",
        );
        let v = serde_json::to_value(&body).expect("ser");
        assert_eq!(v["statusCode"], 422);
        assert_eq!(v["code"], "INSTANCE_ALREADY_ALLOCATED");
        assert_eq!(v["errorCode"], 76006);
        assert!(v.get("attempts").is_none());
        let back: ErrorBody = serde_json::from_value(v).expect("de");
        assert_eq!(back, body);
    }
}
