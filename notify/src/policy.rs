//! The delivery policy, apart from any transport: after an attempt, given how it went and
//! the time, whether the notification is delivered, dead, or tried again (and when); and
//! the circuit breaker that pauses attempts on an endpoint that keeps failing.
//!
//! Time and randomness are passed in, so all of it is tested without sleeping and
//! without a network.

use std::time::{Duration, Instant};

use rand::Rng;

/// Retry and circuit-breaker settings of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per notification before it is a dead letter.
    pub max_attempts: u32,
    /// Wait after the first failed attempt, doubled after each…
    pub backoff: Duration,
    /// …up to this.
    pub max_backoff: Duration,
    /// Consecutive failed attempts (across notifications) that open the circuit…
    pub breaker_failures: u32,
    /// …which then stays open this long before one trial attempt.
    pub breaker_cooldown: Duration,
}

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth retrying (a connection error, a timeout, 5xx, 408, 429).
    Failed(String),
    /// Refused for good (another 4xx): retrying will not help.
    Refused(String),
}

/// What comes next for a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Try again, not before this.
    RetryAt(Instant),
    /// A dead letter, with why.
    Dead(String),
}

/// A change of an endpoint's circuit, for its metric and log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Unchanged,
    Opened,
    Closed,
}

/// One endpoint's circuit breaker: closed, open (attempts paused until a time), or
/// half-open (the cooldown is over: the next attempt is a trial, and a failure opens
/// it again at once). Open and half-open both count as open for the metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failed attempts.
    failures: u32,
    open_until: Option<Instant>,
    /// The latest failure, for dead letters written without an attempt.
    last_error: Option<String>,
}

impl Breaker {
    /// Until when attempts are paused, if they are at `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.open_until.filter(|until| *until > now)
    }

    /// Open or half-open.
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// Why a notification still queued at a stop was not delivered.
    pub fn stopped(&self, now: Instant) -> String {
        let mut error = "sluice stopped before delivery".to_owned();
        if self.paused_until(now).is_some() {
            error.push_str(" (the circuit was open)");
        }
        if let Some(last) = &self.last_error {
            error.push_str("; last error: ");
            error.push_str(last);
        }
        error
    }
}

impl Policy {
    /// After attempt number `attempt` (1-based) of a notification, at `now`.
    pub fn after(
        &self,
        breaker: &mut Breaker,
        attempt: u32,
        outcome: Outcome,
        now: Instant,
        rng: &mut impl Rng,
    ) -> (Next, Circuit) {
        let error = match outcome {
            Outcome::Delivered => return (Next::Delivered, close(breaker)),
            Outcome::Refused(error) => return (Next::Dead(error), close(breaker)),
            Outcome::Failed(error) => error,
        };
        breaker.failures += 1;
        let mut circuit = Circuit::Unchanged;
        if breaker.failures >= self.breaker_failures {
            if breaker.open_until.is_none() {
                circuit = Circuit::Opened;
            }
            breaker.open_until = Some(now + self.breaker_cooldown);
        }
        breaker.last_error = Some(error.clone());
        if attempt >= self.max_attempts {
            let dead = format!("gave up after {attempt} attempts: {error}");
            return (Next::Dead(dead), circuit);
        }
        let mut at = now + self.backoff(attempt, rng);
        if let Some(until) = breaker.paused_until(now) {
            at = at.max(until);
        }
        (Next::RetryAt(at), circuit)
    }

    /// The wait after failed attempt `n` (1-based): `backoff · 2^(n−1)` capped at
    /// `max_backoff`, jittered to between half and all of it, so that endpoints
    /// recovering from an outage are not hit in lockstep.
    pub fn backoff(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let base = self
            .backoff
            .saturating_mul(1 << n.saturating_sub(1).min(20))
            .min(self.max_backoff);
        base.mul_f64(rng.random_range(0.5..=1.0))
    }
}

fn close(breaker: &mut Breaker) -> Circuit {
    breaker.failures = 0;
    breaker.last_error = None;
    match breaker.open_until.take() {
        Some(_) => Circuit::Closed,
        None => Circuit::Unchanged,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> Policy {
        Policy {
            max_attempts: 4,
            backoff: 100 * MS,
            max_backoff: 300 * MS,
            breaker_failures: 3,
            breaker_cooldown: 1000 * MS,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed("HTTP 503".into())
    }

    #[test]
    fn a_failure_is_retried_after_a_doubling_jittered_backoff_then_dead() {
        let (p, mut rng, t0) = (policy(), ChaCha8Rng::seed_from_u64(7), Instant::now());
        let mut b = Breaker {
            failures: 0,
            ..Breaker::default()
        };
        let mut waits = Vec::new();
        for attempt in 1..=2 {
            let (next, _) = p.after(&mut b, attempt, failed(), t0, &mut rng);
            let Next::RetryAt(at) = next else {
                panic!("{next:?}")
            };
            waits.push(at - t0);
        }
        // 100 ms then 200 ms, each jittered to between half and all of it.
        assert!((50 * MS..=100 * MS).contains(&waits[0]), "{waits:?}");
        assert!((100 * MS..=200 * MS).contains(&waits[1]), "{waits:?}");
        // The third failure in a row opens the circuit: the retry waits out the cooldown.
        let (next, circuit) = p.after(&mut b, 3, failed(), t0, &mut rng);
        assert_eq!(
            (next, circuit),
            (Next::RetryAt(t0 + 1000 * MS), Circuit::Opened)
        );
        assert_eq!(b.paused_until(t0), Some(t0 + 1000 * MS));
        let (next, circuit) = p.after(&mut b, 4, failed(), t0 + 1000 * MS, &mut rng);
        assert_eq!(
            (next, circuit),
            (
                Next::Dead("gave up after 4 attempts: HTTP 503".into()),
                Circuit::Unchanged
            ),
            "already open: not opened twice"
        );
    }

    #[test]
    fn the_backoff_is_capped_and_its_jitter_spreads() {
        let (p, mut rng) = (policy(), ChaCha8Rng::seed_from_u64(1));
        let waits: Vec<Duration> = (0..1000).map(|_| p.backoff(30, &mut rng)).collect();
        assert!(waits.iter().all(|w| (150 * MS..=300 * MS).contains(w)));
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*max - *min > 100 * MS, "jittered: {min:?}..{max:?}");
    }

    #[test]
    fn a_refusal_is_dead_at_once_and_a_success_closes_the_circuit() {
        let (p, mut rng, t0) = (policy(), ChaCha8Rng::seed_from_u64(2), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..3 {
            p.after(&mut b, 1, failed(), t0, &mut rng);
        }
        assert!(b.is_open());
        assert_eq!(
            b.stopped(t0),
            "sluice stopped before delivery (the circuit was open); last error: HTTP 503"
        );
        // Half-open after the cooldown: no longer paused, still open.
        let later = t0 + 1001 * MS;
        assert_eq!(b.paused_until(later), None);
        assert!(b.is_open());
        assert_eq!(
            b.stopped(later),
            "sluice stopped before delivery; last error: HTTP 503"
        );
        // A failed trial opens it again for a whole cooldown.
        let (next, circuit) = p.after(&mut b, 1, failed(), later, &mut rng);
        assert_eq!(circuit, Circuit::Unchanged);
        assert_eq!(next, Next::RetryAt(later + 1000 * MS));
        let (next, circuit) = p.after(
            &mut b,
            2,
            Outcome::Refused("HTTP 400".into()),
            later,
            &mut rng,
        );
        assert_eq!(
            (next, circuit),
            (Next::Dead("HTTP 400".into()), Circuit::Closed)
        );
        assert_eq!(b, Breaker::default(), "a refusal proves the endpoint is up");
        p.after(&mut b, 1, failed(), later, &mut rng);
        let (next, circuit) = p.after(&mut b, 2, Outcome::Delivered, later, &mut rng);
        assert_eq!((next, circuit), (Next::Delivered, Circuit::Unchanged));
        assert_eq!(b.failures, 0, "a success resets the count of failures");
    }
}
