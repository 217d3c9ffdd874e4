//! A token bucket for work a client's request makes the Workload Manager ask of the API server
//! (a definition the watch has not delivered, a token it has not reviewed): callers take one
//! ask at a time and are told no when none is left, never made to wait.

use std::time::Instant;

/// `rate` asks a second, up to `burst` at once.
#[derive(Debug)]
pub struct Budget {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    /// A full budget.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes one ask, if there is one left.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = (now - self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// As if `d` more had passed (tests).
    #[cfg(test)]
    fn age(&mut self, d: std::time::Duration) {
        self.at -= d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn asks_come_in_a_burst_then_at_the_rate() {
        let mut budget = Budget::new(10.0, 20.0);
        let burst = (0..100).take_while(|_| budget.take()).count();
        assert_eq!(burst, 20);
        assert!(!budget.take());
        budget.age(Duration::from_millis(250));
        let refilled = (0..100).take_while(|_| budget.take()).count();
        assert_eq!(refilled, 2, "2.5 earned in 250 ms");
    }
}
