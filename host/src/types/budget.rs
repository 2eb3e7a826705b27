//! What one invocation may make the host hold on its behalf, outside the guest's memory limit.

/// Bookkeeping per entry (a staged write, a value read, a message), on top of its bytes: so
/// that a million empty writes cost as much as the maps holding them do.
pub const ENTRY_OVERHEAD: usize = 64;

/// The host memory one invocation has made the host hold: staged writes, copies of values it
/// read, listed keys, outgoing messages, responses of the services it called. Once the limit
/// is passed the invocation fails (500 for a request, a retry for a message) whatever the
/// guest does next, and nothing it staged is kept.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: usize,
    overrun: bool,
}

/// An invocation passed its host-memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the invocation made the host hold more than {limit} bytes (staged writes, values read, \
     messages, responses); see INVOCATION_HOST_BYTES"
)]
pub struct Overrun {
    pub limit: usize,
}

/// Default of `INVOCATION_HOST_BYTES`.
pub const DEFAULT_LIMIT: usize = 16 << 20;

impl Default for Budget {
    fn default() -> Self {
        Budget::new(DEFAULT_LIMIT)
    }
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: 0,
            overrun: false,
        }
    }

    /// Takes `bytes` from the budget, or fails (and keeps failing) if that passes the limit.
    pub fn charge(&mut self, bytes: usize) -> Result<(), Overrun> {
        if self.fits(bytes) {
            self.used += bytes;
            Ok(())
        } else {
            self.overrun = true;
            Err(Overrun { limit: self.limit })
        }
    }

    /// Whether `bytes` more stay within the limit.
    pub fn fits(&self, bytes: usize) -> bool {
        !self.overrun
            && self
                .used
                .checked_add(bytes)
                .is_some_and(|u| u <= self.limit)
    }

    /// Gives back `bytes` the host no longer holds (an overwritten staged value).
    pub fn refund(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Whether the invocation passed its limit at some point: it must then fail.
    pub fn overrun(&self) -> Option<Overrun> {
        self.overrun.then_some(Overrun { limit: self.limit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_then_stays_overrun() {
        let mut b = Budget::new(100);
        b.charge(60).unwrap();
        b.refund(20);
        b.charge(60).unwrap();
        assert!(b.fits(0) && !b.fits(1));
        b.charge(0).unwrap(); // exactly at the limit is within it
        assert_eq!(b.overrun(), None);
        assert_eq!(b.charge(1), Err(Overrun { limit: 100 }));
        b.refund(50);
        assert!(b.charge(1).is_err(), "an overrun invocation stays failed");
        assert!(b.overrun().is_some());
        assert!(!b.fits(0), "nothing fits an overrun invocation");
        assert!(Budget::new(10).charge(usize::MAX).is_err());
        assert!(!Budget::new(10).fits(usize::MAX));
    }
}
