//! Game and management ports, handed out from two separate ranges.
//!
//! Owned by the supervisor task, so it needs no lock. A port is probed free (bound and
//! released) before it is handed out, because other software on the host may hold it. The
//! cursor moves round-robin so a port released a moment ago is the last to be reused.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::ops::RangeInclusive;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error(
        "no free port left in {key} {start}-{end}: {used} are in use by instances and the rest are taken by other programs"
    )]
    Exhausted {
        key: &'static str,
        start: u16,
        end: u16,
        used: usize,
    },
}

#[derive(Debug)]
struct Range {
    key: &'static str,
    ports: RangeInclusive<u16>,
    cursor: u16,
    used: usize,
}

#[derive(Debug)]
pub struct PortPool {
    game: Range,
    management: Range,
    /// One bit per port number.
    taken: Vec<u64>,
}

impl PortPool {
    pub fn new(game: RangeInclusive<u16>, management: RangeInclusive<u16>) -> Self {
        Self {
            game: Range {
                key: "game_ports",
                cursor: *game.start(),
                ports: game,
                used: 0,
            },
            management: Range {
                key: "management_ports",
                cursor: *management.start(),
                ports: management,
                used: 0,
            },
            taken: vec![0; 1024],
        }
    }

    /// A free game port and a free management port.
    pub fn reserve(&mut self) -> Result<(u16, u16), PortError> {
        let game = Self::take(&mut self.game, &mut self.taken, game_port_free)?;
        match Self::take(&mut self.management, &mut self.taken, management_port_free) {
            Ok(management) => Ok((game, management)),
            Err(e) => {
                self.release(game);
                Err(e)
            }
        }
    }

    /// Records ports held by an instance restored from the state file.
    pub fn mark_used(&mut self, port: u16) {
        if !self.is_taken(port) {
            self.set(port, true);
            if let Some(r) = self.range_of(port) {
                r.used += 1;
            }
        }
    }

    pub fn release(&mut self, port: u16) {
        if self.is_taken(port) {
            self.set(port, false);
            if let Some(r) = self.range_of(port) {
                r.used -= 1;
            }
        }
    }

    fn range_of(&mut self, port: u16) -> Option<&mut Range> {
        if self.game.ports.contains(&port) {
            Some(&mut self.game)
        } else if self.management.ports.contains(&port) {
            Some(&mut self.management)
        } else {
            None
        }
    }

    fn is_taken(&self, port: u16) -> bool {
        self.taken[port as usize / 64] & (1 << (port % 64)) != 0
    }

    fn set(&mut self, port: u16, on: bool) {
        let (word, bit) = (port as usize / 64, 1u64 << (port % 64));
        if on {
            self.taken[word] |= bit;
        } else {
            self.taken[word] &= !bit;
        }
    }

    fn take(range: &mut Range, taken: &mut [u64], free: fn(u16) -> bool) -> Result<u16, PortError> {
        let (start, end) = (*range.ports.start(), *range.ports.end());
        let len = usize::from(end - start) + 1;
        for _ in 0..len {
            let port = range.cursor;
            range.cursor = if port == end { start } else { port + 1 };
            let (word, bit) = (port as usize / 64, 1u64 << (port % 64));
            if taken[word] & bit == 0 && free(port) {
                taken[word] |= bit;
                range.used += 1;
                return Ok(port);
            }
        }
        Err(PortError::Exhausted {
            key: range.key,
            start,
            end,
            used: range.used,
        })
    }
}

/// Games listen on all addresses, over TCP or UDP: both must be free.
fn game_port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Arcus listens on loopback.
fn management_port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_distinct_ports_and_skips_busy_ones() {
        // A block of four free game ports and two free management ports, found by probing so
        // that other programs on the machine cannot make this test flaky.
        let (base, busy) = (21_000..29_000u16)
            .step_by(7)
            .find_map(|p| {
                let all_free = (p..p + 4).all(game_port_free);
                let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).ok()?;
                all_free.then_some((p, busy))
            })
            .expect("a free block of ports");
        let mgmt = (31_000..32_700u16)
            .step_by(5)
            .find(|p| (*p..*p + 2).all(management_port_free))
            .expect("two free management ports");
        let mut pool = PortPool::new(base..=base + 3, mgmt..=mgmt + 1);
        let (g, m) = pool.reserve().expect("ports");
        assert_ne!(g, base, "a port held by someone else is skipped");
        assert!((mgmt..=mgmt + 1).contains(&m));
        let (g2, m2) = pool.reserve().expect("ports");
        assert_ne!(g, g2);
        assert_ne!(m, m2);
        assert!(matches!(
            pool.reserve(),
            Err(PortError::Exhausted {
                key: "management_ports",
                ..
            })
        ));
        pool.release(m);
        assert!(pool.reserve().is_ok());
        drop(busy);
    }
}
