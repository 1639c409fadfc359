//! `[mqtt.limits]`: messages and bytes a second one connection may send, as token
//! buckets. MQTT 3.1.1 has no way to say "slow down", so a connection over its rate is
//! slowed: a packet read is handled (delivered, acknowledged) only once the buckets
//! allow it, and the socket is not read while one waits, so TCP's own back-pressure
//! reaches the client and a QoS 1 client sees its PUBACKs come at its rate; other
//! connections are not touched. An MQTT 5 client that stays over its rate (its buckets
//! never refill) for `disconnect_after` is disconnected with 0x96 (message rate too
//! high).

use std::time::Duration;

use tokio::time::Instant;

/// One bucket: `rate` tokens a second, at most `burst` saved up; spending more than
/// there is leaves a debt that is paid back at `rate` before reading goes on.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, burst: Duration) -> Option<Bucket> {
        (rate > 0).then(|| {
            let rate = rate as f64;
            let burst = (rate * burst.as_secs_f64()).max(1.0);
            Bucket {
                rate,
                burst,
                tokens: burst,
            }
        })
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + self.rate * elapsed.as_secs_f64()).min(self.burst);
    }

    /// How long until the debt is paid, if there is one.
    fn wait(&self) -> Option<Duration> {
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }

    fn full(&self) -> bool {
        self.tokens >= self.burst
    }
}

/// A connection's buckets.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
    /// Since when the connection has been over its rate without a break (its buckets
    /// not refilled since).
    over_since: Option<Instant>,
    persistent: Duration,
}

/// The settings of every connection's [`Throttle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    /// PUBLISH packets a second (0: no limit).
    pub messages_per_second: u64,
    /// Bytes read a second (0: no limit).
    pub bytes_per_second: u64,
    /// How much of a second's allowance may be saved up for a burst.
    pub burst: Duration,
    /// Over the rate this long without a break: MQTT 5 clients are disconnected (0x96).
    pub disconnect_after: Duration,
}

impl RateLimits {
    pub fn is_on(&self) -> bool {
        self.messages_per_second > 0 || self.bytes_per_second > 0
    }
}

impl Throttle {
    pub(crate) fn new(limits: &RateLimits, now: Instant) -> Throttle {
        Throttle {
            messages: Bucket::new(limits.messages_per_second, limits.burst),
            bytes: Bucket::new(limits.bytes_per_second, limits.burst),
            last: now,
            over_since: None,
            persistent: limits.disconnect_after,
        }
    }

    /// Spends what was just read: `messages` PUBLISH packets in `bytes` bytes.
    pub(crate) fn spend(&mut self, messages: u64, bytes: u64) {
        if let Some(b) = &mut self.messages {
            b.tokens -= messages as f64;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
    }

    /// When reading may go on (`None`: now), after refilling up to `now`.
    pub(crate) fn resume_at(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        let mut wait = None::<Duration>;
        for bucket in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            bucket.refill(elapsed);
            wait = wait.max(bucket.wait());
        }
        match wait {
            Some(wait) => {
                self.over_since.get_or_insert(now);
                Some(now + wait)
            }
            None => {
                let rested = [&self.messages, &self.bytes]
                    .into_iter()
                    .flatten()
                    .all(Bucket::full);
                if rested {
                    self.over_since = None;
                }
                None
            }
        }
    }

    /// Over the rate for [`RateLimits::disconnect_after`] without a break.
    pub(crate) fn persistent(&self, now: Instant) -> bool {
        !self.persistent.is_zero()
            && self
                .over_since
                .is_some_and(|since| now.saturating_duration_since(since) >= self.persistent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages: u64, bytes: u64) -> RateLimits {
        RateLimits {
            messages_per_second: messages,
            bytes_per_second: bytes,
            burst: Duration::from_secs(1),
            disconnect_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_burst_passes_then_reading_waits_for_the_debt_to_be_paid() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(&limits(100, 0), t0);
        throttle.spend(100, 10_000);
        assert_eq!(
            throttle.resume_at(t0),
            None,
            "a second's worth is the burst"
        );
        throttle.spend(50, 0);
        let resume = throttle.resume_at(t0).unwrap();
        assert_eq!(resume - t0, Duration::from_millis(500), "50 over at 100/s");
        assert_eq!(throttle.resume_at(t0 + Duration::from_millis(500)), None);
        // Refilled, but never beyond the burst.
        throttle.resume_at(t0 + Duration::from_secs(60));
        throttle.spend(150, 0);
        let resume = throttle.resume_at(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(
            resume - (t0 + Duration::from_secs(60)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_slower_bucket_decides_and_staying_over_is_persistent() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(&limits(1_000, 1_000), t0);
        throttle.spend(1, 3_000);
        let resume = throttle.resume_at(t0).unwrap();
        assert_eq!(
            resume - t0,
            Duration::from_secs(2),
            "bytes are the limit here"
        );
        let mut now = t0;
        for _ in 0..12 {
            now += Duration::from_secs(1);
            throttle.spend(0, 2_000);
            assert!(throttle.resume_at(now).is_some());
        }
        assert!(throttle.persistent(now), "over for 12 s");
        let later = now + Duration::from_secs(60);
        assert_eq!(throttle.resume_at(later), None);
        assert!(!throttle.persistent(later), "a break ends it");
    }

    #[test]
    fn no_limits_never_wait() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(&RateLimits::default(), t0);
        throttle.spend(1_000_000, 1 << 30);
        assert_eq!(throttle.resume_at(t0), None);
        assert!(!throttle.persistent(t0 + Duration::from_secs(3600)));
    }
}
