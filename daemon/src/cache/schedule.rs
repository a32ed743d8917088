//! When to call the platform next: the pure schedule maths.
//!
//! Two functions, both taking the random draw as an argument so every
//! branch is tested exactly: [`refresh_delay`] after a success and
//! [`backoff_delay`] after a failure (see the cache's docs for the rules).

use std::time::Duration;

use super::policy::MIN_REFRESH_DELAY;

/// When to refresh a token with `life` left, counted from now.
///
/// `unit` is a uniform random number in `[0, 1)` (the jitter). `unchanged`
/// says the platform just handed out the token we already had: it has not
/// rotated it yet and will only do so closer to expiry, so a short-lived
/// token is then refreshed at 3/4 of its servable life instead of half —
/// with a platform that rotates 5 min before expiry and the default 10 min
/// margin that saves a call per token lifetime and still leaves a quarter of
/// the servable life for retries.
pub(crate) fn refresh_delay(
    life: Duration,
    margin: Duration,
    min_lifetime: Duration,
    unit: f64,
    unchanged: bool,
) -> Duration {
    let jitter = margin.mul_f64(unit.clamp(0.0, 1.0) / 4.0);
    let lead = (margin + jitter).max(min_lifetime);
    // An unrotated token inside the margin (plus the largest jitter) is past
    // its margin refresh already; a fresh jitter draw must not schedule
    // another one seconds later.
    let inside_margin = unchanged && life <= (margin + margin / 4).max(min_lifetime);
    match life.checked_sub(lead) {
        Some(delay) if delay >= MIN_REFRESH_DELAY && !inside_margin => delay,
        // Less life than the margin (the platform refreshes only 5 min before
        // expiry): a fraction of what is still servable.
        _ => {
            let servable = life.saturating_sub(min_lifetime);
            let fraction = if unchanged {
                servable.mul_f64(0.75)
            } else {
                servable / 2
            };
            fraction.max(MIN_REFRESH_DELAY)
        }
    }
}

/// The wait before retry number `attempt` (0-based) after a failure.
///
/// Uniform in `[cap/2, cap]` with `cap = min(max, initial·2^attempt)`;
/// `unit` is uniform in `[0, 1)`.
pub(crate) fn backoff_delay(initial: Duration, max: Duration, attempt: u32, unit: f64) -> Duration {
    let growth = 2u32.saturating_pow(attempt.min(31));
    let cap = initial.saturating_mul(growth).min(max);
    let floor = cap / 2;
    floor + (cap - floor).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Duration = Duration::from_secs(600);
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_comes_margin_plus_jitter_before_expiry() {
        let life = Duration::from_secs(3600);
        assert_eq!(
            refresh_delay(life, M, MIN, 0.0, false),
            Duration::from_secs(3000)
        );
        let latest = refresh_delay(life, M, MIN, 0.0, false);
        let earliest = refresh_delay(life, M, MIN, 0.999_999, false);
        assert!(
            earliest >= Duration::from_secs(3600 - 600 - 150),
            "{earliest:?}"
        );
        assert!(earliest < latest);
        for i in 0..100 {
            let d = refresh_delay(life, M, MIN, f64::from(i) / 100.0, false);
            assert!(d <= latest && d >= earliest, "{d:?}");
        }
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_their_usable_life_never_in_a_loop() {
        // 90 s of life, 60 s minimum: 30 s servable, refresh after 15 s.
        assert_eq!(
            refresh_delay(Duration::from_secs(90), M, MIN, 0.5, false),
            Duration::from_secs(15)
        );
        // Less than the minimum, or nothing at all: the floor, never zero.
        for life in [0, 1, 30, 60, 61] {
            let d = refresh_delay(Duration::from_secs(life), M, MIN, 0.3, true);
            assert!(d >= MIN_REFRESH_DELAY, "{life}s -> {d:?}");
        }
        // A platform that keeps handing out the same token: the delays
        // shrink geometrically to the floor, so the calls before the token
        // becomes unservable are few.
        let mut life = Duration::from_secs(290);
        let mut calls = 0;
        while life > MIN {
            life = life.saturating_sub(refresh_delay(life, M, MIN, 0.5, true));
            calls += 1;
        }
        assert!(calls <= 10, "{calls} calls");
    }

    #[test]
    fn an_unrotated_token_is_refreshed_late_enough_to_meet_the_platforms_window() {
        // The platform rotates 5 min before expiry. At 10..12.5 min before
        // expiry it hands back the same token; the next call must land under
        // its window, so one more call brings the new token.
        for unit in [0.0, 0.5, 0.999] {
            let life = M + M.mul_f64(unit / 4.0);
            let delay = refresh_delay(life, M, MIN, unit, true);
            let left = life - delay;
            assert!(left < Duration::from_secs(300), "{unit}: {left:?} left");
            assert!(
                left >= MIN + (life - MIN) / 4,
                "{unit}: retry slack {left:?}"
            );
        }
        // Whatever the new jitter draw says.
        for unit in [0.0, 0.999] {
            let life = Duration::from_secs(651);
            let delay = refresh_delay(life, M, MIN, unit, true);
            assert_eq!(delay, (life - MIN).mul_f64(0.75), "{unit}");
        }
        // A token that is new to us: half, as before.
        assert_eq!(
            refresh_delay(Duration::from_secs(540), M, MIN, 0.0, false),
            Duration::from_secs(240)
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        assert_eq!(
            backoff_delay(initial, max, 0, 0.0),
            Duration::from_millis(500)
        );
        assert_eq!(backoff_delay(initial, max, 0, 1.0), initial);
        assert_eq!(backoff_delay(initial, max, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(initial, max, 3, 0.0), Duration::from_secs(4));
        for attempt in [0, 1, 5, 8, 9, 20, 31, 1000] {
            let cap = initial
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(max);
            for unit in [0.0, 0.25, 0.5, 0.999] {
                let d = backoff_delay(initial, max, attempt, unit);
                assert!(d >= cap / 2 && d <= cap, "{attempt} {unit}: {d:?}");
            }
        }
        assert_eq!(backoff_delay(initial, max, 1000, 1.0), max);
        // Jitter spreads: two draws differ.
        assert_ne!(
            backoff_delay(initial, max, 6, 0.1),
            backoff_delay(initial, max, 6, 0.9)
        );
    }
}
