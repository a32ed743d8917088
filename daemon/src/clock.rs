//! The clock that measures a token's remaining life across suspend.
//!
//! Remaining life is counted from the lifetime the platform stated, never
//! from the workspace's wall clock (which may be wrong). The monotonic clock
//! that tokio's timers use stops while the machine is suspended, so a laptop
//! waking after its token expired would still believe the token had its old
//! remaining life. `CLOCK_BOOTTIME` keeps counting through suspend; the cache
//! takes the smaller of the two remaining lives, so the monotonic clock still
//! drives timers (and tokio's paused clock in tests) while suspend can only
//! ever make a token look shorter-lived, never longer.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// A reading of a clock that includes suspend, as time since boot.
pub(crate) type BootClock = fn() -> Duration;

/// `CLOCK_BOOTTIME` now. Falls back to `CLOCK_MONOTONIC` (which Linux always
/// has) in the impossible case the kernel refuses; that only loses the
/// suspend correction.
pub(crate) fn boottime() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances() {
        let a = boottime();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime() > a, "CLOCK_BOOTTIME moves forward");
        assert!(a > Duration::ZERO);
    }
}
