//! Each authenticated end user's share of the Router's concurrency slots: with OIDC on, one user
//! holding long requests (streams, long executes) could otherwise take every slot, and every
//! other user got `429`. Administrators (and `agentcube up`'s static token, one for every client)
//! are not counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::RouterError;
use crate::oidc::Caller;

/// In-flight requests per end user (`sub`), at most `max` each.
#[derive(Debug)]
pub struct Shares {
    max: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

impl Shares {
    /// `max` requests per user at once; `None` for 0 (no share).
    pub fn new(max: usize) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            Arc::new(Self {
                max,
                in_flight: Mutex::default(),
            })
        })
    }

    /// Takes one of `caller`'s slots (`None` for administrators), or refuses with `429`.
    pub fn take(self: &Arc<Self>, caller: &Arc<Caller>) -> Result<Option<Share>, RouterError> {
        if caller.is_admin() {
            return Ok(None);
        }
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = match in_flight.get_mut(caller.sub.as_str()) {
            Some(n) => n,
            None => in_flight.entry(caller.sub.clone()).or_insert(0),
        };
        if *n >= self.max {
            return Err(RouterError::UserOverloaded(self.max));
        }
        *n += 1;
        Ok(Some(Share {
            shares: self.clone(),
            caller: caller.clone(),
        }))
    }

    fn give_back(&self, sub: &str) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = in_flight.get_mut(sub) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(sub);
            }
        }
    }
}

/// One request's slot of its user's share, given back when dropped (with the answer's body).
#[derive(Debug)]
pub struct Share {
    shares: Arc<Shares>,
    caller: Arc<Caller>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shares.give_back(&self.caller.sub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sub: &str, roles: &[&str]) -> Arc<Caller> {
        Arc::new(Caller {
            sub: sub.into(),
            email: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        })
    }

    #[test]
    fn each_user_holds_at_most_their_share_and_gives_it_back() {
        let shares = Shares::new(2).unwrap();
        let (alice, bob) = (caller("alice", &[]), caller("bob", &[]));
        let a1 = shares.take(&alice).unwrap();
        let _a2 = shares.take(&alice).unwrap();
        assert!(matches!(
            shares.take(&alice),
            Err(RouterError::UserOverloaded(2))
        ));
        let _b1 = shares.take(&bob).unwrap();
        drop(a1);
        let _a3 = shares.take(&alice).unwrap();
        let admin = caller("root", &["admin"]);
        for _ in 0..5 {
            assert!(shares.take(&admin).unwrap().is_none(), "not counted");
        }
        assert!(Shares::new(0).is_none());
    }

    #[test]
    fn users_with_nothing_in_flight_are_forgotten() {
        let shares = Shares::new(1).unwrap();
        let held: Vec<_> = (0..100)
            .map(|i| shares.take(&caller(&format!("u{i}"), &[])).unwrap())
            .collect();
        assert_eq!(shares.in_flight.lock().unwrap().len(), 100);
        drop(held);
        assert!(shares.in_flight.lock().unwrap().is_empty());
    }
}
