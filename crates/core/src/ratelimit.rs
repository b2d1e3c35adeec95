//! The limit on unknown-token answers per client address, so that nobody can
//! enumerate live tokens by guessing: every endpoint that tells a known token
//! from an unknown one (tokenjobstate; redeem, destroy and link) checks the
//! client's bucket before it looks the token up, and charges it after an
//! unknown answer. Known tokens cost nothing, so legitimate users (who
//! almost never ask about a token that does not exist) never notice.
//!
//! A token bucket per address, kept as its *debt*: the unknown answers not
//! yet paid back at `rate` per second. An address may run up `burst` of
//! them at once; over that, every answer (known tokens included, so that a
//! refusal reveals nothing) is refused until the debt has drained. The
//! arithmetic is here once; the state lives in the process
//! ([`MemoryLimiter`], shared by `satellite serve`'s workers) or in the
//! database (the store's `unknown_answers` table, for CGI programs that live
//! for one request).
//!
//! IPv6 clients are counted per /64: one host usually holds a whole /64, and
//! counting single addresses would give it 2^64 buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::config::Config;
use crate::ipmask::canonical_ip;

/// The limit's settings, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Unknown answers an address may get at once.
    pub burst: f64,
    /// How many more it may get per second after that.
    pub per_sec: f64,
}

/// What an address over its limit is told: when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after_secs: u64,
}

/// With no refill at all, an address over its limit stays there; this is
/// what it is told anyway (an hour, a polite "much later").
const NO_REFILL_RETRY_SECS: u64 = 3600;

impl Limits {
    /// The configured limits, or `None` when the site turned them off.
    pub fn from_config(config: &Config) -> Option<Limits> {
        config.unknown_token_limit.then_some(Limits {
            burst: f64::from(config.unknown_token_burst),
            per_sec: config.unknown_token_rate,
        })
    }

    /// The debt at `now` of a bucket that owed `debt` at `at` (seconds).
    /// A clock that went backwards pays nothing back, and takes nothing.
    pub fn debt_at(&self, debt: f64, at: f64, now: f64) -> f64 {
        let paid = (now - at).max(0.0) * self.per_sec;
        (debt - paid).max(0.0)
    }

    /// Whether one more unknown answer would exceed the burst, given the
    /// current debt; if so, how long until it would not.
    pub fn verdict(&self, debt_now: f64) -> Option<Limited> {
        let excess = debt_now + 1.0 - self.burst;
        if excess <= 0.0 {
            return None;
        }
        let retry_after_secs = if self.per_sec > 0.0 {
            ((excess / self.per_sec).ceil() as u64).max(1)
        } else {
            NO_REFILL_RETRY_SECS
        };
        Some(Limited { retry_after_secs })
    }

    /// How long a bucket with `debt` takes to drain: after that its row or
    /// entry carries nothing and can go. Infinite without refill.
    pub fn drain_secs(&self, debt: f64) -> f64 {
        if self.per_sec > 0.0 {
            debt / self.per_sec
        } else {
            f64::INFINITY
        }
    }
}

/// The bucket an address is counted in: an IPv4 address (IPv4-mapped IPv6
/// included) as itself, an IPv6 address by its /64.
pub fn client_key(addr: IpAddr) -> String {
    match canonical_ip(addr) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(prefix))
        }
    }
}

/// Seconds since the epoch, with the millisecond, for bucket arithmetic.
pub fn epoch_secs(now: chrono::DateTime<chrono::Utc>) -> f64 {
    now.timestamp_millis() as f64 / 1000.0
}

/// Buckets kept in the process, shared by every worker of `satellite serve`.
pub struct MemoryLimiter {
    limits: Limits,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    debt: f64,
    at: f64,
}

/// Drained buckets are dropped when the table grows past this: a sweep
/// costs one pass, at most once per this many new addresses.
const SWEEP_AT: usize = 4096;

impl MemoryLimiter {
    pub fn new(limits: Limits) -> Self {
        MemoryLimiter {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Some` when `key` may not be told about a token now.
    pub fn check(&self, key: &str, now: f64) -> Option<Limited> {
        let buckets = self.lock();
        let debt = buckets
            .get(key)
            .map_or(0.0, |b| self.limits.debt_at(b.debt, b.at, now));
        self.limits.verdict(debt)
    }

    /// Counts one unknown answer to `key`; `Some` when that answer is one
    /// too many (a request that passed [`MemoryLimiter::check`] beside
    /// others from the same address), which must then be refused instead.
    pub fn charge(&self, key: &str, now: f64) -> Option<Limited> {
        let mut buckets = self.lock();
        if buckets.len() >= SWEEP_AT && !buckets.contains_key(key) {
            let limits = self.limits;
            buckets.retain(|_, b| limits.debt_at(b.debt, b.at, now) > 0.0);
        }
        let bucket = buckets
            .entry(key.to_owned())
            .or_insert(Bucket { debt: 0.0, at: now });
        bucket.debt = self.limits.debt_at(bucket.debt, bucket.at, now) + 1.0;
        bucket.at = bucket.at.max(now);
        self.limits.verdict(bucket.debt - 1.0)
    }

    /// A panic elsewhere while the lock was held leaves counts that are
    /// still counts: go on with them.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        burst: 3.0,
        per_sec: 0.5,
    };

    #[test]
    fn a_burst_is_allowed_and_then_one_answer_per_refill() {
        let limiter = MemoryLimiter::new(LIMITS);
        for _ in 0..3 {
            assert_eq!(limiter.check("192.0.2.1", 100.0), None);
            limiter.charge("192.0.2.1", 100.0);
        }
        assert_eq!(
            limiter.check("192.0.2.1", 100.0),
            Some(Limited {
                retry_after_secs: 2
            })
        );
        assert_eq!(limiter.check("192.0.2.2", 100.0), None);
        assert_eq!(
            limiter.check("192.0.2.1", 101.0),
            Some(Limited {
                retry_after_secs: 1
            })
        );
        assert_eq!(limiter.check("192.0.2.1", 102.0), None);
        limiter.charge("192.0.2.1", 102.0);
        assert!(limiter.check("192.0.2.1", 102.0).is_some());
        assert_eq!(limiter.check("192.0.2.1", 108.0), None);
    }

    #[test]
    fn without_refill_the_limit_stays() {
        let limits = Limits {
            burst: 1.0,
            per_sec: 0.0,
        };
        let limiter = MemoryLimiter::new(limits);
        limiter.charge("a", 0.0);
        assert_eq!(
            limiter.check("a", 1e9),
            Some(Limited {
                retry_after_secs: NO_REFILL_RETRY_SECS
            })
        );
    }

    #[test]
    fn a_clock_going_backwards_neither_pays_nor_panics() {
        assert_eq!(LIMITS.debt_at(2.0, 100.0, 50.0), 2.0);
        let limiter = MemoryLimiter::new(LIMITS);
        limiter.charge("a", 100.0);
        limiter.charge("a", 50.0);
        assert_eq!(limiter.check("a", 100.0), None);
        limiter.charge("a", 100.0);
        assert!(limiter.check("a", 100.0).is_some());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::/64");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn drained_buckets_are_swept_when_the_table_is_large() {
        let limiter = MemoryLimiter::new(LIMITS);
        for i in 0..SWEEP_AT {
            limiter.charge(&format!("k{i}"), 0.0);
        }
        limiter.charge("late", 10.0);
        assert_eq!(limiter.lock().len(), 1);
    }
}
