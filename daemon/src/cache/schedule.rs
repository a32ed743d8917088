//! When to call the platform next: a keeper's [`Schedule`] and the pure
//! schedule maths.
//!
//! Two functions, both taking the random draw as an argument so every
//! branch is tested exactly: [`refresh_delay`] after a success and
//! [`backoff_delay`] after a failure (see the cache's docs for the rules).
//! The [`Schedule`]'s transitions apply them: after a grant, after a
//! failure, and for a request outside the schedule.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::policy::{
    CLIENT_CALL_WINDOW, CLIENT_CALLS_PER_WINDOW, CachePolicy, MIN_REFRESH_DELAY, SHORT_LIVED_DELAY,
};
use crate::platform::ErrorClass;

/// Who asked for a refresh outside the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Requester {
    /// A client found no usable token (rate limited, never overrides back-off).
    Client,
    /// A client asked for a repository the held token's scope does not
    /// cover: the grant may have been widened since. Asks the platform for
    /// its current token of this grant (rate limited with clients, never
    /// overrides back-off); an unchanged answer leaves the schedule alone.
    ScopeCheck,
    /// SIGHUP: always calls.
    Operator,
}

/// When the next platform call goes out, and what moves it.
pub(super) struct Schedule {
    pub(super) next_attempt: Instant,
    pub(super) backing_off: bool,
    pub(super) in_flight: bool,
    pub(super) requested: Option<Requester>,
    pub(super) failures: u32,
    /// Tokens in a row that were servable for less than `--min-lifetime`.
    pub(super) short_streak: u32,
    pub(super) unauthorized_retried: bool,
    pub(super) client_calls: VecDeque<Instant>,
}

impl Schedule {
    /// The first call due at `started`.
    pub(super) fn new(started: Instant) -> Self {
        Self {
            next_attempt: started,
            backing_off: false,
            in_flight: false,
            requested: None,
            failures: 0,
            short_streak: 0,
            unauthorized_retried: false,
            client_calls: VecDeque::new(),
        }
    }

    /// When to call next for a token with `life` left: the refresh delay,
    /// bounded like failures from the second nearly dead token in a row;
    /// and whether that bound applies (the platform is short-lived).
    pub(super) fn next_refresh(
        &mut self,
        policy: &CachePolicy,
        life: Duration,
        unit: f64,
        unchanged: bool,
    ) -> (Duration, bool) {
        let mut delay = refresh_delay(
            life,
            policy.refresh_margin,
            policy.min_lifetime,
            unit,
            unchanged,
        );
        // So little servable life that the schedule would call again within
        // seconds: the platform is handing out nearly dead tokens. From the
        // second such token in a row, calls are bounded like failures. (A
        // deployment with short tokens, say 2 minutes, schedules tens of
        // seconds apart and never gets here.)
        if delay < SHORT_LIVED_DELAY {
            self.short_streak = self.short_streak.saturating_add(1);
        } else {
            self.short_streak = 0;
        }
        let short_lived = self.short_streak >= 2;
        if short_lived {
            delay = delay.max(backoff_delay(
                policy.backoff_initial,
                policy.backoff_max,
                self.short_streak - 2,
                unit,
            ));
        }
        (delay, short_lived)
    }

    /// A grant was accepted: the next call in `delay` from `now`, failures
    /// forgotten. Clients may still bring a call forward (rate limited): a
    /// token that is no longer servable must not wait out a back-off.
    pub(super) fn after_grant(&mut self, delay: Duration, now: Instant) {
        self.failures = 0;
        self.unauthorized_retried = false;
        self.backing_off = false;
        self.next_attempt = now + delay;
    }

    /// A call failed with `class` (the platform's `retry_after`, if it
    /// said): the wait before the next one — back-off, one immediate retry
    /// after a first 401/403, the longest wait after a 404 or a refusal.
    pub(super) fn after_failure(
        &mut self,
        policy: &CachePolicy,
        class: ErrorClass,
        retry_after: Option<Duration>,
        now: Instant,
        unit: f64,
    ) -> Duration {
        let delay = match class {
            ErrorClass::Unauthorized if !self.unauthorized_retried => {
                // The bearer may have rotated under us: one immediate retry
                // (the next call re-reads the file).
                self.unauthorized_retried = true;
                Duration::ZERO
            }
            ErrorClass::NotConfigured | ErrorClass::NotGranted => {
                self.unauthorized_retried = false;
                policy.backoff_max.mul_f64(0.75 + unit / 4.0)
            }
            ErrorClass::Unauthorized => self.backoff(policy, unit),
            ErrorClass::Bearer | ErrorClass::Transient => {
                self.unauthorized_retried = false;
                self.backoff(policy, unit)
                    .max(retry_after.unwrap_or_default())
            }
        };
        self.backing_off = true;
        self.next_attempt = now + delay;
        delay
    }

    /// The next back-off wait, counting one more failure.
    fn backoff(&mut self, policy: &CachePolicy, unit: f64) -> Duration {
        let d = backoff_delay(
            policy.backoff_initial,
            policy.backoff_max,
            self.failures,
            unit,
        );
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Whether an out-of-schedule request (taken from `requested`) leads to
    /// a call now (`usable`: a token can be served now); clients are rate
    /// limited and never cut a back-off short.
    pub(super) fn take_request(&mut self, now: Instant, usable: bool) -> bool {
        let Some(requester) = self.requested.take() else {
            return false;
        };
        match requester {
            Requester::Operator => true,
            // The platform is failing: the back-off decides.
            Requester::Client | Requester::ScopeCheck if self.backing_off => false,
            // Someone else's call already produced a token.
            Requester::Client if usable => false,
            // Due anyway (the first call at start): not the client's doing.
            Requester::Client | Requester::ScopeCheck if now >= self.next_attempt => true,
            Requester::Client | Requester::ScopeCheck => match self.client_call(now) {
                Ok(()) => true,
                Err(free_at) => {
                    // A client without a token gets the call when the window
                    // frees; a scope check with a servable token does not
                    // move the schedule (a flood of them must not either).
                    if !usable {
                        self.next_attempt = self.next_attempt.min(free_at);
                    }
                    tracing::debug!(
                        "clients asked for more than {CLIENT_CALLS_PER_WINDOW} platform calls a minute; next call when the window frees"
                    );
                    false
                }
            },
        }
    }

    /// Takes a place in the clients' window of calls, or says when one frees.
    fn client_call(&mut self, now: Instant) -> Result<(), Instant> {
        while self
            .client_calls
            .front()
            .is_some_and(|&t| now.duration_since(t) >= CLIENT_CALL_WINDOW)
        {
            self.client_calls.pop_front();
        }
        if self.client_calls.len() < CLIENT_CALLS_PER_WINDOW {
            self.client_calls.push_back(now);
            Ok(())
        } else {
            Err(self.client_calls.front().copied().unwrap_or(now) + CLIENT_CALL_WINDOW)
        }
    }
}

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

    // ---- the Schedule's transitions, without a runtime ----

    fn policy() -> CachePolicy {
        CachePolicy {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            ..CachePolicy::DEFAULT
        }
    }

    #[test]
    fn a_first_401_is_retried_at_once_the_next_ones_back_off() {
        let now = Instant::now();
        let mut schedule = Schedule::new(now);
        let wait = |s: &mut Schedule, class| s.after_failure(&policy(), class, None, now, 0.0);
        assert_eq!(
            wait(&mut schedule, ErrorClass::Unauthorized),
            Duration::ZERO
        );
        assert!(schedule.backing_off);
        assert_eq!(
            wait(&mut schedule, ErrorClass::Unauthorized),
            Duration::from_millis(500)
        );
        assert_eq!(
            wait(&mut schedule, ErrorClass::Unauthorized),
            Duration::from_secs(1)
        );
        assert_eq!(schedule.next_attempt, now + Duration::from_secs(1));
        // A grant forgets the streak: the next 401 is retried at once again.
        schedule.after_grant(Duration::from_secs(3000), now);
        assert!(!schedule.backing_off);
        assert_eq!(schedule.next_attempt, now + Duration::from_secs(3000));
        assert_eq!(
            wait(&mut schedule, ErrorClass::Unauthorized),
            Duration::ZERO
        );
    }

    #[test]
    fn a_refusal_waits_most_of_the_longest_back_off_and_retry_after_is_a_floor() {
        let now = Instant::now();
        let mut schedule = Schedule::new(now);
        for unit in [0.0, 0.5, 0.999] {
            let wait = schedule.after_failure(&policy(), ErrorClass::NotGranted, None, now, unit);
            assert!(
                (Duration::from_secs(225)..=Duration::from_secs(300)).contains(&wait),
                "{wait:?}"
            );
        }
        let asked = Some(Duration::from_secs(90));
        let wait = schedule.after_failure(&policy(), ErrorClass::Transient, asked, now, 0.0);
        assert_eq!(wait, Duration::from_secs(90), "Retry-After is the floor");
    }

    #[test]
    fn requests_outside_the_schedule_never_cut_a_back_off_short_but_the_operators() {
        let now = Instant::now();
        let mut schedule = Schedule::new(now + Duration::from_secs(60));
        schedule.after_failure(&policy(), ErrorClass::Transient, None, now, 0.0);
        for requester in [Requester::Client, Requester::ScopeCheck] {
            schedule.requested = Some(requester);
            assert!(!schedule.take_request(now, false), "{requester:?}");
            assert_eq!(schedule.requested, None, "taken, not left pending");
        }
        schedule.requested = Some(Requester::Operator);
        assert!(schedule.take_request(now, true));
        // Not backing off: a client without a token calls, one with a
        // usable token does not; the window bounds clients' calls.
        schedule.after_grant(Duration::from_secs(3000), now);
        schedule.requested = Some(Requester::Client);
        assert!(!schedule.take_request(now, true));
        let mut calls = 0;
        for _ in 0..CLIENT_CALLS_PER_WINDOW + 3 {
            schedule.requested = Some(Requester::Client);
            calls += usize::from(schedule.take_request(now, false));
        }
        assert_eq!(calls, CLIENT_CALLS_PER_WINDOW);
        assert_eq!(
            schedule.next_attempt,
            now + CLIENT_CALL_WINDOW,
            "a client without a token gets the call when the window frees"
        );
    }
}
