//! The cache as a whole, on tokio's paused clock, against platform doubles:
//! single flight, the schedule over whole lifetimes, back-off, bootstrap,
//! erase, status, suspend.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use credd_core::platform_api::{TokenQuery, Which};
use credd_core::protocol::{ErrorCode, Response, Scope, Source, TokenState};
use credd_core::repository::RepositoryRef;
use credd_core::secret::Token;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::policy::{CLIENT_CALL_WINDOW, CLIENT_CALLS_PER_WINDOW};
use super::*;
use crate::clock::BootClock;

const M: Duration = Duration::from_secs(600);
const MIN: Duration = Duration::from_secs(60);

/// A platform double: answers from a script, counts calls, and can hold
/// a call until released.
struct FakePlatform {
    calls: AtomicUsize,
    /// `min_remaining` of each call, in order.
    asked_min_remaining: Mutex<Vec<Option<Duration>>>,
    /// SHA-256s reported as refused, in order.
    refusals: Mutex<Vec<String>>,
    script: Mutex<VecDeque<Result<Duration, PlatformError>>>,
    gate: tokio::sync::Semaphore,
}

impl FakePlatform {
    fn new(script: Vec<Result<Duration, PlatformError>>, open: bool) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            asked_min_remaining: Mutex::new(Vec::new()),
            refusals: Mutex::new(Vec::new()),
            script: Mutex::new(script.into()),
            gate: tokio::sync::Semaphore::new(if open {
                tokio::sync::Semaphore::MAX_PERMITS
            } else {
                0
            }),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Fetch for Arc<FakePlatform> {
    async fn fetch(&self, ask: TokenQuery) -> Result<Grant, PlatformError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked_min_remaining
            .lock()
            .unwrap()
            .push(ask.min_remaining);
        // Each call consumes a permit: a test can let calls through one by one.
        self.gate.acquire().await.expect("gate open").forget();
        let next = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(Duration::from_secs(3600)));
        next.map(|lifetime| Grant {
            token: Token::new(format!("ghs_fake{n}")).unwrap(),
            expires_at: SystemTime::now() + lifetime,
            lifetime,
            scope: Scope::default(),
        })
    }

    async fn report_refusal(&self, sha256: &str) -> Result<ReportOutcome, PlatformError> {
        self.refusals.lock().unwrap().push(sha256.to_owned());
        Ok(ReportOutcome::Accepted)
    }
}

/// Like the real platform: caches a token (60 min by default) and rotates
/// it only when little life is left (5 min by default) — or, when it
/// `honours_min_remaining`, when less is left than the caller asks for.
struct RotatingPlatform {
    honours_min_remaining: bool,
    calls: AtomicUsize,
    minted: AtomicUsize,
    current: Mutex<Option<(Token, Instant)>>,
    /// Life of a minted token.
    lifetime: Duration,
    /// The cached token is handed out until it has this little life left.
    rotate_within: Duration,
}

impl Default for RotatingPlatform {
    /// GitHub's hour and the platform's 5-minute rotation window.
    fn default() -> Self {
        Self::new(Duration::from_secs(3600), Duration::from_secs(300))
    }
}

impl RotatingPlatform {
    fn new(lifetime: Duration, rotate_within: Duration) -> Self {
        Self {
            honours_min_remaining: true,
            calls: AtomicUsize::new(0),
            minted: AtomicUsize::new(0),
            current: Mutex::new(None),
            lifetime,
            rotate_within,
        }
    }
}

impl Fetch for Arc<RotatingPlatform> {
    async fn fetch(&self, ask: TokenQuery) -> Result<Grant, PlatformError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let mut current = self.current.lock().unwrap();
        let wanted = match ask.min_remaining {
            Some(min) if self.honours_min_remaining => min.max(self.rotate_within),
            _ => self.rotate_within,
        };
        let stale = current
            .as_ref()
            .is_none_or(|(_, expiry)| expiry.saturating_duration_since(now) < wanted);
        if stale {
            let n = self.minted.fetch_add(1, Ordering::SeqCst);
            let token = Token::new(format!("ghs_rotated{n}")).unwrap();
            *current = Some((token, now + self.lifetime));
        }
        let (token, expiry) = current.clone().expect("minted");
        let lifetime = expiry.saturating_duration_since(now);
        Ok(Grant {
            token,
            expires_at: SystemTime::now() + lifetime,
            lifetime,
            scope: Scope::default(),
        })
    }

    async fn report_refusal(&self, _sha256: &str) -> Result<ReportOutcome, PlatformError> {
        Ok(ReportOutcome::Unsupported)
    }
}

/// Ten hours of clients asking every minute against `platform` with the
/// default margins: (calls, mints); never without a token.
async fn ten_hours_against(platform: RotatingPlatform) -> (usize, usize) {
    let platform = Arc::new(platform);
    let cache = Arc::new(TokenKeeper::kept(
        Arc::clone(&platform),
        CachePolicy::DEFAULT,
        None,
    ));
    let cancel = CancellationToken::new();
    let refresher = Arc::clone(&cache);
    let c = cancel.clone();
    tokio::spawn(async move { refresher.run_refresher(c, |_| false).await });
    for _ in 0..600 {
        let answer = wire(cache.get(None).await);
        assert!(matches!(answer, Response::Token { .. }), "{answer:?}");
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    cancel.cancel();
    (
        platform.calls.load(Ordering::SeqCst),
        platform.minted.load(Ordering::SeqCst),
    )
}

#[tokio::test(start_paused = true)]
async fn one_call_per_token_lifetime_with_the_default_margins() {
    // The daemon's 10-minute margin comes before the platform's 5-minute
    // rotation; asking for more life than it holds makes the platform mint
    // at the first refresh instead of handing back the same token.
    let (calls, minted) = ten_hours_against(RotatingPlatform::default()).await;
    assert!(minted >= 10, "{minted} tokens in 10 h");
    assert_eq!(calls, minted, "{calls} calls for {minted} tokens");
}

#[tokio::test(start_paused = true)]
async fn at_most_two_calls_per_lifetime_from_a_platform_that_ignores_min_remaining() {
    let platform = RotatingPlatform {
        honours_min_remaining: false,
        ..RotatingPlatform::default()
    };
    let (calls, minted) = ten_hours_against(platform).await;
    assert!(minted >= 10, "{minted} tokens in 10 h");
    assert!(calls <= 2 * minted, "{calls} calls for {minted} tokens");
    assert!(
        calls > minted,
        "the old platform's rotation costs a second call"
    );
}

fn policy() -> CachePolicy {
    CachePolicy {
        refresh_margin: M,
        min_lifetime: MIN,
        wait_timeout: Duration::from_secs(4),
        bootstrap_max_age: Duration::from_secs(3000),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
    }
}

fn start(
    platform: &Arc<FakePlatform>,
    policy: CachePolicy,
    bootstrap: Option<&str>,
) -> (Arc<TokenKeeper<Arc<FakePlatform>>>, CancellationToken) {
    // tokio's paused clock drives these tests; a boot clock that stands
    // still leaves every deadline to it (suspend has its own test).
    start_with_boot_clock(platform, policy, bootstrap, || Duration::ZERO)
}

fn start_with_boot_clock(
    platform: &Arc<FakePlatform>,
    policy: CachePolicy,
    bootstrap: Option<&str>,
    boot_clock: BootClock,
) -> (Arc<TokenKeeper<Arc<FakePlatform>>>, CancellationToken) {
    let cache = Arc::new(
        TokenKeeper::kept(
            Arc::clone(platform),
            policy,
            bootstrap.map(|b| Token::new(b.into()).unwrap()),
        )
        .with_boot_clock(boot_clock),
    );
    let cancel = CancellationToken::new();
    let refresher = Arc::clone(&cache);
    let c = cancel.clone();
    tokio::spawn(async move { refresher.run_refresher(c, |_| false).await });
    (cache, cancel)
}

/// The store's outcome as the socket says it.
fn wire(got: Got) -> Response {
    crate::answer::to_get(got)
}

fn sha(hex: &str) -> Sha256Hex {
    Sha256Hex::parse(hex).expect("a SHA-256")
}

fn token_of(r: &Response) -> (String, Source) {
    match r {
        Response::Token { token, source, .. } => (token.expose().to_owned(), *source),
        other => panic!("expected a token, got {other:?}"),
    }
}

fn server_error() -> PlatformError {
    PlatformError::Server {
        status: 500,
        retry_after: None,
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_gets_on_an_empty_cache_share_one_call() {
    let platform = FakePlatform::new(vec![], false);
    let (cache, cancel) = start(&platform, policy(), None);
    let gets: Vec<_> = (0..100)
        .map(|_| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { wire(cache.get(None).await) })
        })
        .collect();
    tokio::task::yield_now().await;
    platform.gate.add_permits(1000);
    for get in gets {
        assert_eq!(token_of(&get.await.unwrap()).0, "ghs_fake0");
    }
    assert_eq!(platform.calls(), 1);
    assert_eq!(cache.status().served, 100);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_of_expiry_once_per_lifetime() {
    let platform = FakePlatform::new(vec![], true);
    let (cache, cancel) = start(&platform, policy(), None);
    assert_eq!(token_of(&wire(cache.get(None).await)).0, "ghs_fake0");
    // 50 minutes later, no second call yet (refresh at 47.5..50 min).
    tokio::time::sleep(Duration::from_secs(47 * 60)).await;
    assert_eq!(platform.calls(), 1);
    tokio::time::sleep(Duration::from_secs(3 * 60 + 1)).await;
    assert_eq!(platform.calls(), 2);
    assert_eq!(token_of(&wire(cache.get(None).await)).0, "ghs_fake1");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_keep_serving_the_cached_token() {
    let platform = FakePlatform::new(
        vec![
            Ok(Duration::from_secs(3600)),
            Err(server_error()),
            Err(server_error()),
            Err(server_error()),
        ],
        true,
    );
    let (cache, cancel) = start(&platform, policy(), None);
    wire(cache.get(None).await);
    cache.refresh_now();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(platform.calls(), 2);
    // While failing: served from cache, no call per client.
    for _ in 0..50 {
        assert_eq!(token_of(&wire(cache.get(None).await)).0, "ghs_fake0");
    }
    assert_eq!(platform.calls(), 2);
    let status = cache.status();
    assert_eq!(status.platform.as_str(), "failing");
    assert!(status.last_error.as_deref().unwrap().contains("500"));
    // Back-off: the next calls come after ≥0.5 s, then ≥1 s, then ≥2 s.
    tokio::time::sleep(Duration::from_millis(499)).await;
    assert_eq!(platform.calls(), 2);
    tokio::time::sleep(Duration::from_millis(502)).await;
    assert_eq!(platform.calls(), 3);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(platform.calls() >= 4);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(cache.status().platform.as_str(), "ok");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn unauthorized_is_retried_once_then_backs_off() {
    let unauthorized = || PlatformError::Unauthorized {
        status: 401,
        path: "/configs/.auth_token".into(),
    };
    let platform = FakePlatform::new((0..10).map(|_| Err(unauthorized())).collect(), true);
    let mut p = policy();
    p.backoff_initial = Duration::from_secs(3600);
    p.backoff_max = Duration::from_secs(3600);
    let (cache, cancel) = start(&platform, p, None);
    let answer = wire(cache.get(None).await);
    assert!(
        matches!(answer, Response::Error { code: ErrorCode::Unavailable, ref message } if message.contains("401")),
        "{answer:?}"
    );
    assert_eq!(platform.calls(), 2, "one immediate retry");
    assert_eq!(cache.status().platform.as_str(), "unauthorized");
    // Clients cannot override the back-off.
    for _ in 0..10 {
        wire(cache.get(None).await);
    }
    assert_eq!(platform.calls(), 2);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn retry_after_and_not_configured_wait_long() {
    let platform = FakePlatform::new(
        vec![
            Err(PlatformError::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            }),
            Err(PlatformError::NotConfigured),
        ],
        true,
    );
    let (cache, cancel) = start(&platform, policy(), None);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(platform.calls(), 1, "Retry-After: 30 honoured");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(platform.calls(), 2);
    assert_eq!(cache.status().platform.as_str(), "not_configured");
    // 404: at least 3/4 of the 5 min cap.
    tokio::time::sleep(Duration::from_secs(223)).await;
    assert_eq!(platform.calls(), 2);
    tokio::time::sleep(Duration::from_secs(80)).await;
    assert_eq!(platform.calls(), 3);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn bootstrap_is_served_until_the_platform_answers_or_its_age_is_up() {
    let platform = FakePlatform::new((0..10_000).map(|_| Err(server_error())).collect(), true);
    let mut p = policy();
    p.bootstrap_max_age = Duration::from_secs(600);
    let (cache, cancel) = start(&platform, p, Some("ghs_bootstrap"));
    let (token, source) = token_of(&wire(cache.get(None).await));
    assert_eq!((token.as_str(), source), ("ghs_bootstrap", Source::Env));
    assert_eq!(cache.status().source, Some(Source::Env));
    tokio::time::sleep(Duration::from_secs(601)).await;
    assert!(matches!(
        wire(cache.get(None).await),
        Response::Error {
            code: ErrorCode::Unavailable,
            ..
        }
    ));
    cancel.cancel();

    let platform = FakePlatform::new(vec![], true);
    let (cache, cancel) = start(&platform, policy(), Some("ghs_bootstrap"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        token_of(&wire(cache.get(None).await)),
        ("ghs_fake0".into(), Source::Platform)
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn erase_drops_only_a_matching_token_and_clients_are_rate_limited() {
    let platform = FakePlatform::new(vec![], true);
    let (cache, cancel) = start(&platform, policy(), None);
    let (first, _) = token_of(&wire(cache.get(None).await));
    let other = credd_core::secret::sha256_hex(b"something else");
    assert!(!cache.erase(&sha(&other)));
    assert!(Sha256Hex::parse("not-hex").is_none());
    // Erase after erase: only CLIENT_CALLS_PER_WINDOW client-caused calls a minute.
    let mut current = first;
    for _ in 0..(CLIENT_CALLS_PER_WINDOW + 3) {
        let hash = credd_core::secret::sha256_hex(current.as_bytes());
        assert!(cache.erase(&sha(&hash)));
        assert_eq!(cache.status().state, Some(TokenState::Missing));
        match wire(cache.get(None).await) {
            Response::Token { token, .. } => current = token.expose().to_owned(),
            Response::Error { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(platform.calls(), 1 + CLIENT_CALLS_PER_WINDOW);
    // The window frees up: the next call happens without a client.
    tokio::time::sleep(CLIENT_CALL_WINDOW + Duration::from_secs(1)).await;
    assert_eq!(platform.calls(), 2 + CLIENT_CALLS_PER_WINDOW);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_token_below_the_minimum_life_is_never_served() {
    let platform = FakePlatform::new(
        (0..1000).map(|_| Ok(Duration::from_secs(20))).collect(),
        true,
    );
    let (cache, cancel) = start(&platform, policy(), None);
    let answer = wire(cache.get(None).await);
    assert!(
        matches!(answer, Response::Error { code: ErrorCode::Unavailable, ref message } if message.contains("min-lifetime")),
        "{answer:?}"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Backed off (≥0.5 s, ≥1 s, ≥2 s, …) rather than looping.
    assert!(platform.calls() < 10, "{}", platform.calls());
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn sighup_overrides_the_back_off_and_many_make_one_follow_up_call() {
    let platform = FakePlatform::new(vec![Err(server_error())], false);
    let mut p = policy();
    p.backoff_initial = Duration::from_secs(3600);
    p.backoff_max = Duration::from_secs(3600);
    let (cache, cancel) = start(&platform, p, None);
    platform.gate.add_permits(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(platform.calls(), 1);
    assert!(cache.status().next_refresh_in_secs.unwrap() >= 1800);
    // The operator's override: a call now, whatever the back-off says.
    cache.refresh_now();
    platform.gate.add_permits(1);
    assert_eq!(token_of(&wire(cache.get(None).await)).0, "ghs_fake1");
    assert_eq!(platform.calls(), 2);
    // SIGHUPs during a call (it may have read the old bearer) lead to one
    // more call after it, not one each.
    cache.refresh_now();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(platform.calls(), 3, "in flight");
    for _ in 0..5 {
        cache.refresh_now();
    }
    platform.gate.add_permits(10);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(platform.calls(), 4);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn status_and_health_follow_the_token() {
    let platform = FakePlatform::new(
        std::iter::once(Ok(Duration::from_secs(3600)))
            .chain((0..1000).map(|_| Err(server_error())))
            .collect(),
        true,
    );
    let (cache, cancel) = start(&platform, policy(), None);
    wire(cache.get(None).await);
    let status = cache.status();
    assert_eq!(status.state, Some(TokenState::Valid));
    assert_eq!(status.source, Some(Source::Platform));
    assert_eq!(status.expires_in_secs, Some(3600));
    assert_eq!(status.platform.as_str(), "ok");
    assert_eq!((status.platform_calls, status.served), (1, 1));
    let next = status.next_refresh_in_secs.expect("scheduled");
    assert!((2850..=3000).contains(&next), "{next}");
    let line = super::status::line(&cache.status(), &[]);
    assert!(
        line.starts_with("token from platform, expires in 1h"),
        "{line}"
    );
    assert!(!line.contains("ghs_"), "{line}");
    assert!(cache.is_healthy());

    // The refresh fails from then on: healthy while the token is
    // servable, not once it is gone.
    tokio::time::sleep(Duration::from_secs(3600 - 59)).await;
    let status = cache.status();
    assert_eq!(status.state, Some(TokenState::Missing));
    assert_eq!(status.platform.as_str(), "failing");
    assert!(!cache.is_healthy());
    let line = super::status::line(&cache.status(), &[]);
    assert!(
        line.starts_with("no usable token; platform failing: "),
        "{line}"
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_get_waits_at_most_the_wait_timeout() {
    let platform = FakePlatform::new(vec![], false);
    let (cache, cancel) = start(&platform, policy(), None);
    let started = Instant::now();
    let answer = wire(cache.get(None).await);
    assert!(matches!(
        answer,
        Response::Error {
            code: ErrorCode::Unavailable,
            ..
        }
    ));
    assert_eq!(started.elapsed(), policy().wait_timeout);
    assert_eq!(platform.calls(), 1);
    assert_eq!(cache.status().next_refresh_in_secs, Some(0));
    cancel.cancel();
}

/// Seconds the simulated machine has been suspended (read by
/// [`suspended_clock`]); only the suspend test moves it.
static SUSPENDED_SECS: AtomicU64 = AtomicU64::new(0);

fn suspended_clock() -> Duration {
    Duration::from_secs(SUSPENDED_SECS.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn a_suspend_longer_than_the_life_left_makes_the_token_unservable() {
    let platform = FakePlatform::new(
        (0..4).map(|_| Ok(Duration::from_secs(3600))).collect(),
        true,
    );
    let (cache, cancel) = start_with_boot_clock(&platform, policy(), None, suspended_clock);
    let (first, _) = token_of(&wire(cache.get(None).await));
    assert_eq!(platform.calls(), 1);
    // The machine sleeps 70 minutes; the monotonic (paused) clock does
    // not move, exactly as CLOCK_MONOTONIC does not during suspend.
    SUSPENDED_SECS.store(70 * 60, Ordering::SeqCst);
    assert_eq!(cache.status().state, Some(TokenState::Missing));
    let (second, _) = token_of(&wire(cache.get(None).await));
    assert_ne!(
        first, second,
        "the dead token is never served after the wake"
    );
    assert_eq!(platform.calls(), 2);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn served_expiry_is_this_machines_clock_plus_the_life_left() {
    let platform = FakePlatform::new(vec![Ok(Duration::from_secs(3600))], true);
    let (cache, cancel) = start(&platform, policy(), None);
    let Response::Token { expires_at, .. } = wire(cache.get(None).await) else {
        panic!("a token");
    };
    let expected = unix_secs(SystemTime::now() + Duration::from_secs(3600));
    assert!(
        expires_at.abs_diff(expected) <= 2,
        "{expires_at} vs local now + 3600 s = {expected}"
    );
    assert_eq!(
        cache.status().expires_at.map(|e| e.abs_diff(expected) <= 2),
        Some(true)
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn tokens_barely_above_the_minimum_life_are_fetched_at_a_bounded_rate() {
    // A platform that hands out fresh 61-s tokens forever (min 60 s).
    let platform = FakePlatform::new(
        (0..2000)
            .map(|_| Ok(MIN + Duration::from_secs(1)))
            .collect(),
        true,
    );
    let (cache, cancel) = start(&platform, policy(), None);
    wire(cache.get(None).await);
    tokio::time::sleep(Duration::from_secs(20 * 60)).await;
    let calls = platform.calls();
    // Unbounded, that is one call a second (1,200); with the back-off
    // (initial 1 s doubling to the 5-min cap) it is a few dozen at most.
    assert!(calls <= 30, "{calls} platform calls in 20 minutes");
    assert!(calls >= 5, "still asks: {calls}");
    let status = cache.status();
    assert_eq!(status.platform.as_str(), "short_lived", "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("in a row")),
        "{status:?}"
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn two_minute_tokens_stay_servable_however_the_short_lived_back_off_counts() {
    // A platform that hands out its cached token while more than half its
    // life is left, then mints: grants of 60-120 s with a 2-minute token.
    let platform = Arc::new(RotatingPlatform::new(
        Duration::from_secs(120),
        Duration::from_secs(60),
    ));
    let cache = Arc::new(
        TokenKeeper::kept(Arc::clone(&platform), policy(), None).with_boot_clock(|| Duration::ZERO),
    );
    let cancel = CancellationToken::new();
    let refresher = Arc::clone(&cache);
    let c = cancel.clone();
    tokio::spawn(async move { refresher.run_refresher(c, |_| false).await });
    wire(cache.get(None).await);
    let samples = 20 * 60 / 5;
    let mut unserved = 0;
    for _ in 0..samples {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if cache.status().state != Some(TokenState::Valid) {
            unserved += 1;
        }
    }
    // The platform hands out its token until it has exactly the daemon's
    // --min-lifetime left, so a second or two between tokens is inherent;
    // a back-off that kept growing would leave most samples without one.
    assert!(
        unserved * 20 <= samples,
        "{unserved} of {samples} samples without a servable token"
    );
    cancel.cancel();
}

/// A platform with grants: the default account is `acme` (limited to
/// `acme/api` unless widened), `labs` is granted whole, owners starting
/// with `down` fail (HTTP 500), every other owner is refused; a test can
/// revoke an owner or widen `acme`'s repositories. Tokens live an hour;
/// every call and refusal report is logged in order.
struct GrantingPlatform {
    log: Mutex<Vec<String>>,
    acme_repositories: Mutex<Vec<String>>,
    revoked: Mutex<Vec<String>>,
}

impl Default for GrantingPlatform {
    fn default() -> Self {
        Self {
            log: Mutex::default(),
            acme_repositories: Mutex::new(vec!["acme/api".to_owned()]),
            revoked: Mutex::default(),
        }
    }
}

impl GrantingPlatform {
    fn calls_for(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == what)
            .count()
    }
    fn calls_starting(&self, prefix: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&format!("fetch {prefix}")))
            .count()
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn revoke(&self, owner: &str) {
        self.revoked.lock().unwrap().push(owner.to_owned());
    }
    fn grant_acme(&self, repository: &str) {
        self.acme_repositories
            .lock()
            .unwrap()
            .push(repository.to_owned());
    }
}

impl Fetch for Arc<GrantingPlatform> {
    async fn fetch(&self, ask: TokenQuery) -> Result<Grant, PlatformError> {
        let owner = match &ask.which {
            Which::Owner(owner) => owner.as_str(),
            _ => "acme",
        };
        let n = {
            let mut log = self.log.lock().unwrap();
            log.push(format!("fetch {owner}"));
            log.len()
        };
        let refused = || PlatformError::NotGranted {
            what: format!("owner {owner}"),
        };
        if self.revoked.lock().unwrap().iter().any(|r| r == owner) {
            return Err(refused());
        }
        let repositories = match owner {
            "acme" => Some(self.acme_repositories.lock().unwrap().clone()),
            "labs" => None,
            down if down.starts_with("down") => return Err(server_error()),
            _ => return Err(refused()),
        };
        let lifetime = Duration::from_secs(3600);
        Ok(Grant {
            token: Token::new(format!("ghs_{owner}{n}")).unwrap(),
            expires_at: SystemTime::now() + lifetime,
            lifetime,
            scope: Scope {
                owner: Some(owner.to_owned()),
                repositories,
                permissions: None,
            },
        })
    }

    async fn report_refusal(&self, sha256: &str) -> Result<ReportOutcome, PlatformError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("refused {}", &sha256[..12]));
        Ok(ReportOutcome::Accepted)
    }
}

fn start_tokens(
    platform: &Arc<GrantingPlatform>,
) -> (Arc<TokenStore<Arc<GrantingPlatform>>>, CancellationToken) {
    let cancel = CancellationToken::new();
    let tokens = TokenStore::start(Arc::clone(platform), policy(), None, None, &cancel);
    (Arc::new(tokens), cancel)
}

fn repo(text: &str) -> Which {
    Which::Repository(RepositoryRef::parse(text).unwrap())
}

fn code_of(r: &Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn held_owners(tokens: &TokenStore<Arc<GrantingPlatform>>) -> Vec<String> {
    tokens
        .status()
        .owners
        .iter()
        .map(|t| t.scope.owner.clone().unwrap_or_default())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn tokens_are_chosen_by_owner_and_held_scope() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    assert_eq!(
        token_of(&wire(tokens.get(&Which::Default).await)).0,
        "ghs_acme1"
    );
    // The default token is acme's: acme's repositories need no call of their own.
    assert_eq!(
        token_of(&wire(tokens.get(&repo("Acme/API")).await)).0,
        "ghs_acme1"
    );
    assert_eq!(
        token_of(&wire(tokens.get(&Which::Owner("acme".into())).await)).0,
        "ghs_acme1"
    );
    // Outside the held scope: the grant is checked once (a new token, the
    // same scope), then refused.
    let outside = wire(tokens.get(&repo("acme/secret")).await);
    assert_eq!(code_of(&outside), ErrorCode::NotGranted);
    assert_eq!(platform.calls_for("fetch acme"), 2);
    // Another owner: a token of its own, with its scope in the answer.
    let labs = wire(tokens.get(&repo("labs/tool")).await);
    match &labs {
        Response::Token { token, scope, .. } => {
            assert_eq!(token.expose(), "ghs_labs3");
            assert_eq!(scope.owner.as_deref(), Some("labs"));
            assert_eq!(scope.repositories, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        token_of(&wire(tokens.get(&repo("labs/other")).await)).0,
        "ghs_labs3"
    );
    // An owner outside the grant: not_granted, and asking again does not
    // make the platform hear about it again.
    for _ in 0..5 {
        assert_eq!(
            code_of(&wire(tokens.get(&repo("evil/x")).await)),
            ErrorCode::NotGranted
        );
    }
    assert_eq!(platform.calls_for("fetch evil"), 1);
    let status = tokens.status();
    assert_eq!(status.token.scope.owner.as_deref(), Some("acme"));
    let owners: Vec<_> = status
        .owners
        .iter()
        .map(|t| (t.scope.owner.clone().unwrap(), t.state))
        .collect();
    // The refused owner holds no slot.
    assert_eq!(owners, [("labs".to_owned(), Some(TokenState::Valid))]);
    cancel.cancel();
}

/// Issue 20, item 3: a refused owner's cache never retired and kept its
/// slot, so 32 refused owners (a repository's submodules) locked every
/// granted owner out. Refused owners hold no slot; each is asked once per
/// back-off however often git asks, and a granted owner is served after
/// any number of them.
#[tokio::test(start_paused = true)]
async fn refused_owners_hold_no_slot_and_cost_one_call_per_back_off() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    for round in 0..3 {
        for n in 0..100 {
            let answer = wire(tokens.get(&repo(&format!("evil{n}/x"))).await);
            assert_eq!(code_of(&answer), ErrorCode::NotGranted, "{answer:?}");
        }
        assert_eq!(held_owners(&tokens), Vec::<String>::new(), "round {round}");
    }
    assert_eq!(
        platform.calls_starting("evil"),
        100,
        "one call per refused owner"
    );
    let labs = wire(tokens.get(&Which::Owner("labs".into())).await);
    assert!(token_of(&labs).0.starts_with("ghs_labs"));
    assert_eq!(held_owners(&tokens), ["labs"]);
    // After the back-off (at most --backoff-max), one call each again.
    tokio::time::sleep(policy().backoff_max).await;
    for n in 0..100 {
        wire(tokens.get(&repo(&format!("evil{n}/x"))).await);
        wire(tokens.get(&repo(&format!("evil{n}/y"))).await);
    }
    assert_eq!(platform.calls_starting("evil"), 200);
    cancel.cancel();
}

/// Slots held by caches without a token that wait out a back-off (a
/// platform failing for those owners) are freed for a new owner; their
/// owners are answered from memory until the back-off ends.
#[tokio::test(start_paused = true)]
async fn a_full_table_of_failing_owners_makes_room_for_a_new_one() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    let mut gets = tokio::task::JoinSet::new();
    for n in 0..store::MAX_OWNER_TOKENS {
        let tokens = Arc::clone(&tokens);
        gets.spawn(async move { wire(tokens.get(&Which::Owner(format!("down{n}"))).await) });
    }
    while let Some(answer) = gets.join_next().await {
        assert_eq!(code_of(&answer.expect("get")), ErrorCode::Unavailable);
    }
    let failing = held_owners(&tokens);
    assert_eq!(failing.len(), store::MAX_OWNER_TOKENS);
    let labs = wire(tokens.get(&Which::Owner("labs".into())).await);
    assert!(token_of(&labs).0.starts_with("ghs_labs"));
    let held = held_owners(&tokens);
    assert_eq!(held.len(), store::MAX_OWNER_TOKENS);
    assert!(held.contains(&"labs".to_owned()));
    // The benched owner is answered from memory until its back-off ends.
    let benched: Vec<&String> = failing.iter().filter(|o| !held.contains(o)).collect();
    assert_eq!(benched.len(), 1, "{failing:?} -> {held:?}");
    let calls = platform.calls_starting("down");
    let answer = wire(tokens.get(&Which::Owner(benched[0].clone())).await);
    assert_eq!(code_of(&answer), ErrorCode::Unavailable, "{answer:?}");
    assert_eq!(platform.calls_starting("down"), calls, "no call for it");
    cancel.cancel();
}

/// Issue 20, item 7: a 403 for an owner whose token is held used to leave
/// that token served until it expired. The refusal drops it, for a
/// per-owner token and for the default one.
#[tokio::test(start_paused = true)]
async fn a_revoked_grant_stops_the_held_token_at_the_refusal() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    token_of(&wire(tokens.get(&Which::Default).await));
    token_of(&wire(tokens.get(&Which::Owner("labs".into())).await));
    platform.revoke("labs");
    platform.revoke("acme");
    tokens.refresh_now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(platform.calls_for("fetch labs"), 2);
    assert_eq!(platform.calls_for("fetch acme"), 2);
    for want in [
        Which::Owner("labs".into()),
        repo("labs/tool"),
        Which::Default,
        repo("acme/api"),
    ] {
        let answer = wire(tokens.get(&want).await);
        assert_eq!(
            code_of(&answer),
            ErrorCode::NotGranted,
            "{want:?}: {answer:?}"
        );
    }
    assert_eq!(held_owners(&tokens), Vec::<String>::new());
    assert_eq!(tokens.status().token.state, Some(TokenState::Missing));
    cancel.cancel();
}

/// Issue 20, item 7: a widened grant was answered `not_granted` from the
/// held scope until the next scheduled refresh. The next request for the
/// new repository sees it; a flood of requests outside the grant costs at
/// most the clients' rate of platform calls.
#[tokio::test(start_paused = true)]
async fn a_widened_grant_is_seen_on_the_next_request_at_a_bounded_rate() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    token_of(&wire(tokens.get(&Which::Default).await));
    platform.grant_acme("acme/new");
    let (token, _) = token_of(&wire(tokens.get(&repo("acme/new")).await));
    assert_eq!(token, "ghs_acme2", "a fresh token with the wider scope");
    assert_eq!(platform.calls_for("fetch acme"), 2);
    // Untrusted content asking for many repositories outside the grant.
    for n in 0..200 {
        let answer = wire(tokens.get(&repo(&format!("acme/other{n}"))).await);
        assert_eq!(code_of(&answer), ErrorCode::NotGranted);
    }
    let calls = platform.calls_for("fetch acme");
    assert!(
        calls <= 2 + CLIENT_CALLS_PER_WINDOW,
        "{calls} calls for 200 requests outside the grant"
    );
    // The granted ones keep being served meanwhile.
    assert!(
        token_of(&wire(tokens.get(&repo("acme/new")).await))
            .0
            .starts_with("ghs_acme")
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_owner_token_nobody_asks_for_is_dropped_at_expiry() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    token_of(&wire(tokens.get(&repo("labs/tool")).await));
    // Served during its life: refreshed once. The next one nobody asks for.
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(platform.calls_for("fetch labs"), 2);
    assert!(tokens.status().owners.is_empty(), "{:?}", tokens.status());
    // The default token is kept fresh meanwhile.
    assert!(platform.calls_for("fetch acme") >= 3);
    // Asked again: a new cache, a new call.
    token_of(&wire(tokens.get(&Which::Owner("labs".into())).await));
    assert_eq!(platform.calls_for("fetch labs"), 3);
    // Asked during its life: kept fresh.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1800)).await;
        token_of(&wire(tokens.get(&Which::Owner("labs".into())).await));
    }
    assert!(platform.calls_for("fetch labs") >= 5);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_is_reported_before_the_next_call() {
    let platform = Arc::new(GrantingPlatform::default());
    let (tokens, cancel) = start_tokens(&platform);
    let (labs, _) = token_of(&wire(tokens.get(&Which::Owner("labs".into())).await));
    let hash = credd_core::secret::sha256_hex(labs.as_bytes());
    assert!(tokens.erase(&sha(&hash)));
    assert!(!tokens.erase(&sha(&hash)));
    assert!(
        Sha256Hex::parse("zz").is_none(),
        "an erase without a SHA-256 never reaches the store"
    );
    let (fresh, _) = token_of(&wire(tokens.get(&Which::Owner("labs".into())).await));
    assert_ne!(fresh, labs);
    let log = platform.log();
    let reported = log
        .iter()
        .position(|l| *l == format!("refused {}", &hash[..12]))
        .expect("reported");
    assert_eq!(log[reported + 1], "fetch labs", "{log:?}");
    cancel.cancel();
}

/// Without grants the platform states no account, and the default token
/// speaks for every owner. A token git was refused with (erased) must be
/// replaced there, with the refusal reported first — not fetched again,
/// unreported, by a new per-owner cache while the default one holds none
/// (found with the README's configuration: `useHttpPath`, no grants).
#[tokio::test(start_paused = true)]
async fn an_erased_unscoped_token_is_replaced_by_the_default_cache_after_its_report() {
    let platform = FakePlatform::new(vec![], true);
    let cancel = CancellationToken::new();
    let tokens = TokenStore::start(Arc::clone(&platform), policy(), None, None, &cancel);
    token_of(&wire(tokens.get(&Which::Default).await));
    let (first, _) = token_of(&wire(tokens.get(&repo("acme/project")).await));
    let hash = credd_core::secret::sha256_hex(first.as_bytes());
    assert!(tokens.erase(&sha(&hash)));
    let (second, _) = token_of(&wire(tokens.get(&repo("acme/project")).await));
    assert_ne!(second, first);
    assert_eq!(*platform.refusals.lock().unwrap(), [hash]);
    assert!(tokens.status().owners.is_empty(), "no per-owner cache");
    assert_eq!(platform.calls(), 2);
    cancel.cancel();
}

/// The store owns what belongs to the daemon: an account's token runs the
/// `--on-refresh` hook and shows in systemd's `STATUS=` just as the
/// default one does, and its changes reach the store's subscribers.
#[tokio::test(start_paused = true)]
async fn every_accounts_token_reaches_the_hook_and_the_status_line() {
    let platform = Arc::new(GrantingPlatform::default());
    let heard: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let hook: RefreshHook = {
        let heard = Arc::clone(&heard);
        Box::new(move |token: &Token, whose: Whose<'_>| {
            heard
                .lock()
                .unwrap()
                .push((token.expose().to_owned(), format!("{whose:?}")));
        })
    };
    let cancel = CancellationToken::new();
    let tokens = TokenStore::start(Arc::clone(&platform), policy(), None, Some(hook), &cancel);
    let mut changes = tokens.subscribe();
    token_of(&wire(tokens.get(&Which::Default).await));
    assert!(changes.has_changed().unwrap(), "the default token's change");
    changes.mark_unchanged();
    token_of(&wire(tokens.get(&repo("labs/tool")).await));
    assert!(changes.has_changed().unwrap(), "an account's change");
    assert_eq!(
        code_of(&wire(tokens.get(&repo("evil/x")).await)),
        ErrorCode::NotGranted
    );
    assert_eq!(
        *heard.lock().unwrap(),
        [
            (
                "ghs_acme1".to_owned(),
                r#"Default { account: Some("acme") }"#.to_owned()
            ),
            ("ghs_labs2".to_owned(), r#"Owner("labs")"#.to_owned()),
        ]
    );
    let line = tokens.status_line();
    assert!(
        line.starts_with("token from platform, expires in 59m")
            && line.contains("; platform ok; accounts: labs expires in 59m"),
        "{line}"
    );
    assert!(
        !line.contains("evil"),
        "a refused owner holds no slot: {line}"
    );
    assert!(!line.contains("ghs_"), "{line}");
    // Dropping the store stops every refresher: no call after it.
    let calls = platform.log().len();
    drop(tokens);
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(platform.log().len(), calls, "{:?}", platform.log());
}
