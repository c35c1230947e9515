//! The allocation engine: a pure function from (candidates, resolved filter) to the chosen
//! candidate or a refusal that says what removed every candidate.
//!
//! Order: bare metal before virtual machines (a VM is chosen only when no bare-metal candidate
//! is left, or when the filter asks for `isVirtual=1`); inside a tier, pack: prefer the host
//! that already runs the most allocations, so that empty hosts can be drained.

use std::cmp::Reverse;
use std::collections::BTreeMap;

/// Why a candidate cannot be allocated right now. `Allocatable` is the only good answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Availability {
    Allocatable,
    Allocated,
    Allocating,
    /// Status other than 4 (starting, offline, setup).
    NotOnline,
    /// Starting, and the agent cannot establish the game's Arcus link (it says why).
    NoLink,
    ArcusDown,
    HostUnreachable,
    /// The host's agent did not answer a call and no probe has had an answer since (though it
    /// may still heartbeat).
    AgentNotAnswering,
    /// The host's agent could not record an allocation on its disk a moment ago.
    AgentCannotRecord,
    /// The host has not re-registered since the controller started.
    HostResyncing,
    HostDraining,
    /// The agent refused this instance a moment ago; skipped until it reports again.
    RecentlyRefused,
    /// Being stopped or removed.
    Stopping,
    /// Released, waiting for the game to acknowledge it.
    Releasing,
}

impl Availability {
    fn reason(self) -> &'static str {
        match self {
            Self::Allocatable => "idle",
            Self::Allocated => "allocated",
            Self::Allocating => "being allocated",
            Self::NotOnline => "not online (starting or offline)",
            Self::NoLink => {
                "starting with no Arcus link to their game (berthctl instances show ID says why)"
            }
            Self::ArcusDown => "with the Arcus link down",
            Self::HostUnreachable => "on unreachable hosts",
            Self::AgentNotAnswering => {
                "on hosts whose agent does not answer the controller's calls (berthctl hosts show says why)"
            }
            Self::AgentCannotRecord => {
                "on hosts whose agent could not record an allocation on its disk a moment ago"
            }
            Self::HostResyncing => "on hosts not yet re-registered after a controller restart",
            Self::HostDraining => "on draining hosts",
            Self::RecentlyRefused => "just refused by their agent",
            Self::Stopping => "being stopped or removed",
            Self::Releasing => "waiting for their game to acknowledge a release",
        }
    }
}

/// What the engine needs to know about one candidate.
#[derive(Debug, Clone)]
pub struct Facts {
    pub host_id: u64,
    pub fleet_id: Option<u64>,
    pub environment_id: Option<u32>,
    pub region_id: u32,
    pub dc_location_id: u32,
    pub is_virtual: bool,
    pub availability: Availability,
    /// Allocations currently held on this candidate's host (for packing).
    pub host_allocations: u32,
}

/// A filter condition with names already resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    FleetIds(Vec<u64>),
    EnvironmentIds(Vec<u32>),
    RegionIds(Vec<u32>),
    DcLocationIds(Vec<u32>),
    IsVirtual(bool),
}

impl Cond {
    /// Shared with the inventory's candidate index, which must choose exactly as [`choose`].
    pub fn matches(&self, f: &Facts) -> bool {
        match self {
            Self::FleetIds(ids) => f.fleet_id.is_some_and(|id| ids.contains(&id)),
            Self::EnvironmentIds(ids) => f.environment_id.is_some_and(|id| ids.contains(&id)),
            Self::RegionIds(ids) => ids.contains(&f.region_id),
            Self::DcLocationIds(ids) => ids.contains(&f.dc_location_id),
            Self::IsVirtual(v) => f.is_virtual == *v,
        }
    }
}

/// A resolved filter: conditions with the text they came from (`fleetId=456`).
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub conds: Vec<(Cond, String)>,
}

impl Resolved {
    pub fn text(&self) -> String {
        self.conds
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    }

    fn first_mismatch(&self, f: &Facts) -> Option<usize> {
        self.conds.iter().position(|(c, _)| !c.matches(f))
    }
}

/// Why nothing could be chosen, with the counts to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub total: usize,
    /// For each condition, how many candidates it removed (first failing condition counts).
    pub removed_by: Vec<(String, usize)>,
    pub matching: usize,
    pub unavailable: BTreeMap<Availability, usize>,
    pub filter: String,
}

impl Refusal {
    /// The sentence for `details`: which filter or condition removed the candidates.
    pub fn details(&self, application_id: u32) -> String {
        if self.total == 0 {
            return format!(
                "application {application_id} has no instances; create a fleet for it or check that its hosts are registered"
            );
        }
        if self.matching == 0 {
            let removed: Vec<String> = self
                .removed_by
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| format!("{c} removed {n}"))
                .collect();
            return format!(
                "no instance of application {application_id} matches {}: of its {} instances, {}",
                self.filter,
                self.total,
                removed.join(", ")
            );
        }
        let parts: Vec<String> = self
            .unavailable
            .iter()
            .map(|(a, n)| format!("{n} {}", a.reason()))
            .collect();
        let subject = if self.filter.is_empty() {
            format!(
                "application {application_id} has {} instances",
                self.matching
            )
        } else {
            format!("{} matches {} instances", self.filter, self.matching)
        };
        format!("{subject}: {}", parts.join(", "))
    }

    /// Counts as JSON for the error story.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "filter": self.filter,
            "candidates": self.total,
            "removedByFilter": self.removed_by.iter().map(|(c, n)| serde_json::json!({"condition": c, "removed": n})).collect::<Vec<_>>(),
            "matching": self.matching,
            "unavailable": self.unavailable.iter().map(|(a, n)| (a.reason().to_owned(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Where a host ranks (lower first): bare metal first, then the busiest host, then the lowest
/// host id. The inventory orders its candidate index by it too.
pub type Rank = (bool, Reverse<u32>, u64);

pub fn rank(is_virtual: bool, host_allocations: u32, host_id: u64) -> Rank {
    (is_virtual, Reverse(host_allocations), host_id)
}

/// Picks the best allocatable candidate, or says why there is none.
pub fn choose(candidates: &[Facts], filter: &Resolved) -> Result<usize, Refusal> {
    let mut best: Option<(usize, Rank)> = None;
    for (i, f) in candidates.iter().enumerate() {
        if f.availability != Availability::Allocatable || filter.first_mismatch(f).is_some() {
            continue;
        }
        let key = rank(f.is_virtual, f.host_allocations, f.host_id);
        if best.as_ref().is_none_or(|(_, k)| key < *k) {
            best = Some((i, key));
        }
    }
    if let Some((i, _)) = best {
        return Ok(i);
    }
    let mut removed = vec![0usize; filter.conds.len()];
    let mut matching = 0;
    let mut unavailable = BTreeMap::new();
    for f in candidates {
        match filter.first_mismatch(f) {
            Some(c) => removed[c] += 1,
            None => {
                matching += 1;
                *unavailable.entry(f.availability).or_insert(0) += 1;
            }
        }
    }
    Err(Refusal {
        total: candidates.len(),
        removed_by: filter
            .conds
            .iter()
            .zip(removed)
            .map(|((_, t), n)| (t.clone(), n))
            .collect(),
        matching,
        unavailable,
        filter: filter.text(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(host: u64, vm: bool, a: Availability, allocs: u32) -> Facts {
        Facts {
            host_id: host,
            fleet_id: Some(456),
            environment_id: Some(1),
            region_id: 1,
            dc_location_id: 1,
            is_virtual: vm,
            availability: a,
            host_allocations: allocs,
        }
    }

    use Availability::*;

    #[test]
    fn bare_metal_before_vm() {
        let c = vec![
            facts(1, true, Allocatable, 5),
            facts(2, false, Allocatable, 0),
        ];
        assert_eq!(choose(&c, &Resolved::default()), Ok(1));
        // Only VM left: VM it is.
        let c = vec![
            facts(1, true, Allocatable, 0),
            facts(2, false, Allocated, 0),
        ];
        assert_eq!(choose(&c, &Resolved::default()), Ok(0));
        // isVirtual=1 asks for VMs.
        let f = Resolved {
            conds: vec![(Cond::IsVirtual(true), "isVirtual=1".into())],
        };
        let c = vec![
            facts(2, false, Allocatable, 0),
            facts(1, true, Allocatable, 0),
        ];
        assert_eq!(choose(&c, &f), Ok(1));
    }

    #[test]
    fn packs_onto_busy_hosts() {
        let c = vec![
            facts(1, false, Allocatable, 0),
            facts(2, false, Allocatable, 3),
            facts(3, false, Allocatable, 1),
        ];
        assert_eq!(choose(&c, &Resolved::default()), Ok(1));
    }

    #[test]
    fn refusal_names_the_cause() {
        let f = Resolved {
            conds: vec![(Cond::FleetIds(vec![456]), "fleetId=456".into())],
        };
        let mut c = vec![facts(1, false, Allocated, 1); 38];
        c.push(facts(2, false, HostUnreachable, 0));
        c.push(facts(2, false, HostUnreachable, 0));
        let r = choose(&c, &f).expect_err("nothing free");
        assert_eq!(
            r.details(7),
            "fleetId=456 matches 40 instances: 38 allocated, 2 on unreachable hosts"
        );
        let f = Resolved {
            conds: vec![(Cond::RegionIds(vec![9]), "regionId=9".into())],
        };
        let r = choose(&c, &f).expect_err("no match");
        assert_eq!(
            r.details(7),
            "no instance of application 7 matches regionId=9: of its 40 instances, regionId=9 removed 40"
        );
        assert!(
            choose(&[], &f)
                .expect_err("empty")
                .details(7)
                .contains("no instances")
        );
    }
}
