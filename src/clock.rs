//! Injected wall-clock time, so tests move time instead of sleeping.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        #[allow(clippy::disallowed_methods)] // the one place the wall clock is read
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Mutex::new(start))
    }

    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Injected randomness: the jitter of the lock loop and of discovery. Production draws from the
/// thread's generator; the fleet simulation seeds one per instance, so a run repeats exactly.
pub trait Random: Send + Sync + 'static {
    /// A number in `0.0..1.0`.
    fn unit(&self) -> f64;
}

/// `rand`'s thread-local generator.
#[cfg(feature = "daemon")]
pub struct ThreadRandom;

#[cfg(feature = "daemon")]
impl Random for ThreadRandom {
    fn unit(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// A seeded generator (a small xorshift: deterministic, no shared state between instances).
pub struct SeededRandom(Mutex<u64>);

impl SeededRandom {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so neighbouring seeds start far apart and 0 is not stuck.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        SeededRandom(Mutex::new((z ^ (z >> 31)) | 1))
    }
}

impl Random for SeededRandom {
    fn unit(&self) -> f64 {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Wall-clock time that follows tokio's clock: `start` plus the tokio time elapsed since it was
/// made. Under a paused runtime (`tokio::time::pause`) the two move together, so code that reads
/// [`Clock::now`] and sleeps with `tokio::time::sleep` sees one consistent virtual time.
#[cfg(feature = "proxy")]
pub struct TokioClock {
    start: SystemTime,
    base: tokio::time::Instant,
}

#[cfg(feature = "proxy")]
impl TokioClock {
    pub fn new(start: SystemTime) -> Self {
        TokioClock {
            start,
            base: tokio::time::Instant::now(),
        }
    }
}

#[cfg(feature = "proxy")]
impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.base.elapsed()
    }
}
