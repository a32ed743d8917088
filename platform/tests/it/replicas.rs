//! Replicas sharing one token cache through a real `redis-server` (issue
//! 19): three real `molecule-platform` processes in GitHub mode against the
//! `github-stand-in` process, 100 workspaces spread over them.
//!
//! What is counted is what GitHub would see: the stand-in's record of
//! issued tokens. Rounds of requests are placed by the tokens' own
//! `expires_at` (each round starts inside the previous token's refresh
//! window), never by guessed sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use nix::sys::signal::Signal;
use testkit::{PlatformProcess, RedisServer};

use crate::support::{assert_no_secrets, http, sha256_hex};

/// Workspaces in the fleet.
const WORKSPACES: usize = 100;
/// Replicas.
const REPLICAS: usize = 3;
/// The grants workspaces are spread over: (owner asked for, grants file
/// entry). Workspace `i` has grant `i % GRANTS.len()`.
const GRANTS: [(&str, &str); 4] = [
    (
        "acme",
        "repositories = [\"acme/api\"]\npermissions = { contents = \"read\" }",
    ),
    (
        "acme",
        "repositories = [\"acme/web\"]\npermissions = { contents = \"read\" }",
    ),
    (
        "acme-labs",
        "repositories = [\"acme-labs/*\"]\npermissions = { contents = \"read\" }",
    ),
    (
        "acme",
        "repositories = [\"acme/api\", \"acme/web\"]\npermissions = { contents = \"write\" }",
    ),
];
/// Token lifetime the stand-in issues: short, so the tests see several.
const LIFE_SECS: i64 = 8;
/// Each round starts this long before the previous token expires: inside
/// its refresh window (half its life, less the second GitHub's
/// `expires_at` rounds off), with half its life for the round itself.
const ROUND_BEFORE_EXPIRY: Duration = Duration::from_millis(3000);
/// The mint lock's expiry in these tests.
const LOCK_TTL: &str = "3s";

struct Fleet {
    dir: tempfile::TempDir,
    redis: RedisServer,
    stand_in: testkit::Process,
    stand_in_url: String,
    prefix: String,
    key_file: String,
    replicas: Vec<Option<PlatformProcess>>,
    bearers: Vec<String>,
    lock_ttl: &'static str,
}

/// One answer of a replica.
#[derive(Clone, Debug)]
struct Served {
    status: u16,
    token: Option<String>,
    expires_at: Option<jiff::Timestamp>,
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with(LOCK_TTL).await
    }

    /// With a mint lock expiring after `lock_ttl` (humantime).
    async fn start_with(lock_ttl: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start();
        let keys_dir = dir.path().join("keys");
        let testkit::StandInProcess {
            process: stand_in,
            url: stand_in_url,
            ..
        } = testkit::StandInProcess::spawn(&[
            "--keys-dir",
            keys_dir.to_str().unwrap(),
            "--install",
            "acme=1001",
            "--install",
            "acme-labs=1002",
        ]);
        let answer = http()
            .put(format!("{stand_in_url}/_stand-in/mode"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "issue_secs": LIFE_SECS }).to_string())
            .send()
            .await
            .expect("mode");
        assert_eq!(answer.status().as_u16(), 204);

        let bearers: Vec<String> = (0..WORKSPACES)
            .map(|i| format!("bearer-of-replicated-ws-{i:03}-{}", random_hex(8)))
            .collect();
        let mut tokens = String::new();
        let mut grants = String::new();
        for (i, bearer) in bearers.iter().enumerate() {
            tokens.push_str(&format!("ws-{i} {}\n", sha256_hex(bearer)));
            grants.push_str(&format!(
                "[workspace.ws-{i}]\n{}\n\n",
                GRANTS[i % GRANTS.len()].1
            ));
        }
        std::fs::write(dir.path().join("workspace-tokens"), tokens).expect("write");
        std::fs::write(dir.path().join("grants.toml"), grants).expect("write");
        let key_file = dir.path().join("cache.key");
        std::fs::write(&key_file, random_hex(32)).expect("write");
        let mut fleet = Self {
            redis,
            stand_in,
            stand_in_url,
            prefix: format!("test-{}:", random_hex(4)),
            key_file: key_file.to_str().unwrap().to_owned(),
            replicas: Vec::new(),
            bearers,
            dir,
            lock_ttl,
        };
        for _ in 0..REPLICAS {
            let replica = fleet.spawn_replica(&fleet.key_file.clone());
            fleet.replicas.push(Some(replica));
        }
        fleet
    }

    /// A replica of this fleet, sealing with `key_file`.
    fn spawn_replica(&self, key_file: &str) -> PlatformProcess {
        self.spawn_replica_with(key_file, &self.redis.url())
    }

    /// A replica sealing with `key_file` and sharing through `redis_url`.
    fn spawn_replica_with(&self, key_file: &str, redis_url: &str) -> PlatformProcess {
        let dir = self.dir.path();
        let key = dir.join("keys").join("app.pem");
        let tokens = dir.join("workspace-tokens");
        let grants = dir.join("grants.toml");
        PlatformProcess::spawn(
            &["--listen", "127.0.0.1:0"],
            &[
                ("GITHUB_APP_ID", "4242"),
                ("GITHUB_APP_INSTALLATION_ID", "777"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", key.to_str().unwrap()),
                ("GITHUB_API_URL", &self.stand_in_url),
                ("PLATFORM_WORKSPACE_TOKENS_FILE", tokens.to_str().unwrap()),
                ("PLATFORM_GRANTS_FILE", grants.to_str().unwrap()),
                ("PLATFORM_REDIS_URL", redis_url),
                ("PLATFORM_REDIS_KEY_PREFIX", &self.prefix),
                ("PLATFORM_CACHE_KEY_FILE", key_file),
                ("PLATFORM_REDIS_LOCK_TTL", self.lock_ttl),
                // Generous: the test machine's cores are shared, and a slow
                // answer here would count as Redis being down.
                ("PLATFORM_REDIS_TIMEOUT", "3s"),
            ],
        )
    }

    fn url(&self, replica: usize) -> String {
        self.replicas[replica].as_ref().expect("running").url()
    }

    /// Workspace `ws` asks replica `replica` for its token.
    async fn get(&self, replica: usize, ws: usize) -> Served {
        get(&self.url(replica), ws, &self.bearers[ws]).await
    }

    /// Every workspace asks once, workspace `i` on replica `i % REPLICAS`,
    /// all at once. Answers by workspace.
    async fn round(&self) -> Vec<Served> {
        let mut tasks = tokio::task::JoinSet::new();
        for ws in 0..WORKSPACES {
            let url = self.url(ws % REPLICAS);
            let bearer = self.bearers[ws].clone();
            tasks.spawn(async move { (ws, get(&url, ws, &bearer).await) });
        }
        let mut served = vec![None; WORKSPACES];
        while let Some(done) = tasks.join_next().await {
            let (ws, answer) = done.expect("task");
            served[ws] = Some(answer);
        }
        served.into_iter().map(|s| s.expect("answered")).collect()
    }

    /// Tokens GitHub (the stand-in) issued so far.
    async fn issued(&self) -> u64 {
        self.record().await["issued"].as_u64().expect("issued")
    }

    async fn record(&self) -> serde_json::Value {
        let bytes = http()
            .get(format!("{}/_stand-in/record", self.stand_in_url))
            .send()
            .await
            .expect("record")
            .bytes()
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    async fn set_mode(&self, mode: serde_json::Value) {
        let answer = http()
            .put(format!("{}/_stand-in/mode", self.stand_in_url))
            .header("content-type", "application/json")
            .body(mode.to_string())
            .send()
            .await
            .expect("mode");
        assert_eq!(answer.status().as_u16(), 204);
    }

    /// Every key under the fleet's prefix and its value.
    fn redis_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut connection = self.redis.connection();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query(&mut connection)
            .expect("KEYS");
        let mut data = BTreeMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(&mut connection)
                .expect("SCAN");
            for key in batch {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query(&mut connection)
                    .expect("GET");
                data.insert(key, value.unwrap_or_default());
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        assert_eq!(
            keys.len(),
            data.len(),
            "SCAN saw every key: {keys:?} vs {:?}",
            data.keys()
        );
        for key in data.keys() {
            assert!(
                key.starts_with(&self.prefix),
                "a key outside the prefix {}: {key}",
                self.prefix
            );
        }
        data
    }

    /// Every output and the stand-in's: no token or bearer in any.
    fn assert_quiet(&self, tokens: &BTreeSet<String>) {
        let mut secrets: Vec<String> = tokens.iter().cloned().collect();
        secrets.extend(self.bearers.iter().cloned());
        for (i, replica) in self.replicas.iter().enumerate() {
            if let Some(replica) = replica {
                assert_no_secrets(&format!("replica {i} stderr"), &replica.stderr(), &secrets);
            }
        }
        assert_no_secrets("stand-in stdout", &self.stand_in.stdout().text(), &secrets);
    }
}

/// Workspace `ws` reports (at `url`: a replica or the balancer) that GitHub
/// refused `token`.
async fn refuse(url: &str, ws: usize, bearer: &str, token: &str) -> reqwest::Response {
    http()
        .post(format!(
            "{url}/workspaces/ws-{ws}/github-installation-token/refusals"
        ))
        .bearer_auth(bearer)
        .header("content-type", "application/json")
        .body(format!(r#"{{"sha256": "{}"}}"#, sha256_hex(token)))
        .send()
        .await
        .expect("refusal")
}

async fn get(url: &str, ws: usize, bearer: &str) -> Served {
    let owner = GRANTS[ws % GRANTS.len()].0;
    let response = http()
        .get(format!(
            "{url}/workspaces/ws-{ws}/github-installation-token?owner={owner}"
        ))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.expect("body")).unwrap_or_default();
    Served {
        status,
        token: body["token"].as_str().map(str::to_owned),
        expires_at: body["expires_at"]
            .as_str()
            .map(|t| t.parse().expect("RFC 3339")),
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Sleeps until `ROUND_BEFORE_EXPIRY` before the earliest `expires_at` of
/// `served`: the next round starts inside the refresh window of every
/// token served now.
async fn until_refresh(served: &[Served]) {
    let earliest = served
        .iter()
        .filter_map(|s| s.expires_at)
        .min()
        .expect("an expiry");
    let at = earliest - jiff::SignedDuration::try_from(ROUND_BEFORE_EXPIRY).unwrap();
    let wait = at.duration_since(jiff::Timestamp::now());
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
}

/// Distinct tokens per grant in `served`, all of which must be 200s.
fn tokens_by_grant(served: &[Served]) -> Vec<BTreeSet<String>> {
    let mut by_grant = vec![BTreeSet::new(); GRANTS.len()];
    for (ws, answer) in served.iter().enumerate() {
        assert_eq!(answer.status, 200, "ws-{ws}: {answer:?}");
        by_grant[ws % GRANTS.len()].insert(answer.token.clone().expect("token"));
    }
    by_grant
}

/// Seals `plain` as the platform would, under `key`, for `redis_key`.
fn seal(key: &[u8; 32], redis_key: &str, plain: &[u8]) -> Vec<u8> {
    let sealer = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut buffer = plain.to_vec();
    sealer
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(redis_key.as_bytes()),
            &mut buffer,
        )
        .unwrap();
    let mut out = vec![1u8];
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buffer);
    out
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

async fn metrics(url: &str) -> String {
    http()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// 100 workspaces over 3 replicas, 4 grants, over 3 token lifetimes:
/// GitHub issues exactly one token per grant per lifetime for the whole
/// fleet (without sharing: one per replica), every workspace of a grant
/// gets the same token, and Redis holds no token or bearer — not in any
/// value (`SCAN` + `GET`), not in the RDB file after `SAVE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_mint_per_grant_for_the_whole_fleet_over_several_lifetimes() {
    let fleet = Fleet::start().await;
    // Another application's key in the same Redis: never touched.
    let mut connection = fleet.redis.connection();
    let _: () = redis::cmd("SET")
        .arg("other-app:session")
        .arg("theirs")
        .query(&mut connection)
        .expect("SET");
    let mut all_tokens = BTreeSet::new();
    let mut served = Vec::new();
    const ROUNDS: u64 = 3;
    for round in 0..ROUNDS {
        if round > 0 {
            until_refresh(&served).await;
        }
        served = fleet.round().await;
        let by_grant = tokens_by_grant(&served);
        for (grant, tokens) in by_grant.iter().enumerate() {
            assert_eq!(
                tokens.len(),
                1,
                "round {round}: every workspace of grant {grant} on every replica gets one token"
            );
            assert!(
                all_tokens.insert(tokens.first().unwrap().clone()),
                "round {round}: grant {grant}'s token is new (the last one was in its refresh window)"
            );
        }
        assert_eq!(
            fleet.issued().await,
            (round + 1) * GRANTS.len() as u64,
            "round {round}: one mint per grant for the whole fleet"
        );
    }
    let record = fleet.record().await;
    assert_eq!(record["rejections"], serde_json::json!([]), "{record}");
    let mut hits = 0;
    for replica in 0..REPLICAS {
        let text = metrics(&fleet.url(replica)).await;
        hits += metric(
            &text,
            "molecule_platform_shared_cache_total{event=\"hit\"} ",
        );
        assert_eq!(
            metric(
                &text,
                "molecule_platform_shared_cache_total{event=\"fallback\"} "
            ),
            0,
            "replica {replica}: Redis was up throughout"
        );
    }
    assert!(
        hits >= (REPLICAS as u64 - 1) * GRANTS.len() as u64 * ROUNDS,
        "the other replicas read each token from Redis: {hits} hits"
    );

    let theirs: Option<String> = redis::cmd("GET")
        .arg("other-app:session")
        .query(&mut connection)
        .expect("GET");
    assert_eq!(theirs.as_deref(), Some("theirs"));
    let _: () = redis::cmd("DEL")
        .arg("other-app:session")
        .query(&mut connection)
        .expect("DEL");

    // What Redis holds: sealed tokens under the prefix, nothing in clear.
    let data = fleet.redis_data();
    let token_keys: Vec<&String> = data
        .keys()
        .filter(|k| k.starts_with(&format!("{}token:", fleet.prefix)))
        .collect();
    assert_eq!(token_keys.len(), GRANTS.len(), "{:?}", data.keys());
    let mut secrets: Vec<String> = all_tokens.iter().cloned().collect();
    secrets.extend(fleet.bearers.iter().cloned());
    for (key, value) in &data {
        let text = String::from_utf8_lossy(value);
        assert_no_secrets(&format!("Redis value of {key}"), &text, &secrets);
        assert_no_secrets("a Redis key", key, &secrets);
        assert!(!text.contains("ghs_"), "{key} holds a token-shaped value");
    }
    let _: () = redis::cmd("SAVE").query(&mut connection).expect("SAVE");
    let rdb = std::fs::read(fleet.redis.dir().join("dump.rdb")).expect("the RDB file");
    let rdb_text = String::from_utf8_lossy(&rdb);
    assert!(
        rdb_text.contains(&fleet.prefix),
        "the RDB file holds the entries"
    );
    assert_no_secrets("the RDB file", &rdb_text, &secrets);
    assert!(
        !rdb_text.contains("ghs_"),
        "the RDB holds a token-shaped value"
    );
    fleet.assert_quiet(&all_tokens);
}

/// Entries that do not open under the replica's key are misses, never
/// served: one edited, one truncated, one moved from another grant's key,
/// one sealed under another key (holding a token GitHub never issued).
/// A fresh replica (nothing cached locally) mints for each and says so
/// once; a replica with another key file never serves the fleet's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_moved_truncated_and_foreign_entries_are_never_served() {
    let fleet = Fleet::start().await;
    let first = tokens_by_grant(&fleet.round().await);
    let issued = fleet.issued().await;
    assert_eq!(issued, GRANTS.len() as u64);
    let mut connection = fleet.redis.connection();
    let data = fleet.redis_data();
    let mut keys: Vec<String> = data
        .keys()
        .filter(|k| k.starts_with(&format!("{}token:", fleet.prefix)))
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(keys.len(), 4);
    let forged = format!("ghs_forged{}", random_hex(20));
    let forged_entry = seal(
        &[0x5a; 32],
        &keys[3],
        serde_json::json!({
            "token": forged,
            "minted_at_ms": jiff::Timestamp::now().as_millisecond(),
            "expires_at_ms": (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(50)).as_millisecond(),
            "permissions": {},
        })
        .to_string()
        .as_bytes(),
    );
    let mut edited = data[&keys[0]].clone();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x01;
    let truncated = data[&keys[1]][..data[&keys[1]].len() - 5].to_vec();
    let moved = data[&keys[0]].clone();
    for (key, value) in [
        (&keys[0], edited),
        (&keys[1], truncated),
        (&keys[2], moved),
        (&keys[3], forged_entry),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query(&mut connection)
            .expect("SET");
    }

    let fresh = fleet.spawn_replica(&fleet.key_file);
    let mut seen = BTreeSet::new();
    for (ws, before) in first.iter().enumerate() {
        let answer = get(&fresh.url(), ws, &fleet.bearers[ws]).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let token = answer.token.expect("token");
        assert_ne!(token, forged, "a token sealed under another key is served");
        assert!(
            !before.contains(&token),
            "grant {ws}: the entry did not open, so a new token was minted"
        );
        seen.insert(token);
    }
    assert_eq!(
        fleet.issued().await,
        issued + GRANTS.len() as u64,
        "one mint per entry that did not open"
    );
    let text = metrics(&fresh.url()).await;
    assert!(
        metric(
            &text,
            "molecule_platform_shared_cache_total{event=\"rejected\"} "
        ) >= GRANTS.len() as u64,
        "{text}"
    );
    let stderr = fresh.stderr();
    assert_eq!(
        stderr
            .matches("does not open with this replica's cache key")
            .count(),
        1,
        "logged once:\n{stderr}"
    );

    // A replica with another key never serves the fleet's entries.
    let other_key = fleet.dir.path().join("other.key");
    std::fs::write(&other_key, random_hex(32)).expect("write");
    let stranger = fleet.spawn_replica(other_key.to_str().unwrap());
    let answer = get(&stranger.url(), 0, &fleet.bearers[0]).await;
    assert_eq!(answer.status, 200);
    let token = answer.token.expect("token");
    assert!(!seen.contains(&token) && !first[0].contains(&token));
    let mut all: BTreeSet<String> = seen;
    all.extend(first.into_iter().flatten());
    all.insert(token);
    all.insert(forged);
    assert_no_secrets(
        "fresh replica stderr",
        &fresh.stderr(),
        &all.iter().cloned().collect::<Vec<_>>(),
    );
    fleet.assert_quiet(&all);
}

/// A refusal reported to replica A of a token A never served (B and C
/// did): the shared entry goes, B and C drop their copies at once, no
/// replica serves it again, and the next request anywhere gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_on_one_replica_is_never_served_again_by_the_others() {
    let fleet = Fleet::start().await;
    // Replica A learns the installations serving workspace 0 (grant 0).
    assert_eq!(fleet.get(0, 0).await.status, 200);
    // Workspaces 1 and 5 have grant 1, on replicas 1 and 2.
    let on_b = fleet.get(1, 1).await;
    let on_c = fleet.get(2, 5).await;
    assert_eq!((on_b.status, on_c.status), (200, 200));
    let refused = on_b.token.clone().expect("token");
    assert_eq!(on_c.token.as_deref(), Some(refused.as_str()), "shared");
    assert_eq!(fleet.issued().await, 2);

    let response = refuse(&fleet.url(0), 9, &fleet.bearers[9], &refused).await;
    assert_eq!(
        response.status().as_u16(),
        204,
        "replica A never held it, but the fleet did"
    );

    let mut tokens = BTreeSet::from([refused.clone()]);
    let mut next = None;
    for (replica, ws) in [(1, 1), (2, 5), (0, 9), (1, 13), (2, 17)] {
        let answer = fleet.get(replica, ws).await;
        assert_eq!(answer.status, 200);
        let token = answer.token.expect("token");
        assert_ne!(token, refused, "replica {replica} served the refused token");
        if let Some(next) = &next {
            assert_eq!(&token, next, "one new token for the fleet");
        }
        next = Some(token.clone());
        tokens.insert(token);
    }
    assert_eq!(fleet.issued().await, 3, "one new mint for the fleet");

    // The refusal limit is the fleet's: ws-9 refusing again within the
    // interval, now on replica B, is limited, and the token stays.
    let again = next.expect("a new token");
    let response = refuse(&fleet.url(1), 9, &fleet.bearers[9], &again).await;
    assert_eq!(
        response.status().as_u16(),
        429,
        "one drop per interval for the fleet"
    );
    assert!(response.headers().contains_key("retry-after"));
    let answer = fleet.get(2, 5).await;
    assert_eq!(answer.token.as_deref(), Some(again.as_str()));
    assert_eq!(fleet.issued().await, 3);
    fleet.assert_quiet(&tokens);
}

/// `redis-server` killed mid-run, then restarted: no request fails; while
/// it is down each replica mints for itself (one per grant per replica),
/// and once it is back, one mint per grant for the whole fleet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_fails_no_request() {
    let mut fleet = Fleet::start().await;
    let grants = GRANTS.len() as u64;
    let mut all = BTreeSet::new();
    let served = fleet.round().await;
    all.extend(tokens_by_grant(&served).into_iter().flatten());
    assert_eq!(fleet.issued().await, grants);

    fleet.redis.kill();
    // Tokens still fresh: served from each replica's cache.
    let cached = fleet.round().await;
    all.extend(tokens_by_grant(&cached).into_iter().flatten());
    assert_eq!(fleet.issued().await, grants, "nothing to mint yet");
    // In the refresh window with Redis down: each replica mints its own.
    until_refresh(&served).await;
    let down = fleet.round().await;
    let by_grant = tokens_by_grant(&down);
    for (grant, tokens) in by_grant.iter().enumerate() {
        assert_eq!(
            tokens.len(),
            REPLICAS,
            "grant {grant}: one token per replica while Redis is down"
        );
    }
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(fleet.issued().await, grants + grants * REPLICAS as u64);
    for replica in 0..REPLICAS {
        let text = metrics(&fleet.url(replica)).await;
        assert!(
            metric(
                &text,
                "molecule_platform_shared_cache_total{event=\"fallback\"} "
            ) >= grants,
            "replica {replica} counted its local mints: {text}"
        );
        let stderr = fleet.replicas[replica].as_ref().unwrap().stderr();
        assert_eq!(
            stderr
                .matches("serving from and minting into this replica's own cache")
                .count(),
            1,
            "replica {replica}: logged once per episode:\n{stderr}"
        );
    }

    fleet.redis.restart();
    until_refresh(&down).await;
    let back = fleet.round().await;
    let by_grant = tokens_by_grant(&back);
    for (grant, tokens) in by_grant.iter().enumerate() {
        assert_eq!(tokens.len(), 1, "grant {grant}: shared again");
    }
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(
        fleet.issued().await,
        2 * grants + grants * REPLICAS as u64,
        "one mint per grant for the fleet once Redis is back"
    );
    for replica in 0..REPLICAS {
        let stderr = fleet.replicas[replica].as_ref().unwrap().stderr();
        assert!(
            stderr.contains("answering again"),
            "replica {replica}:\n{stderr}"
        );
    }
    fleet.assert_quiet(&all);
}

/// A replica SIGKILLed while it holds the mint lock (GitHub not answering
/// its mint): the others wait at most the lock's expiry, then one mints,
/// and both get that token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_holding_the_mint_lock_stalls_the_others_only_until_its_expiry() {
    // Long enough that the lock is still held when the others ask.
    let mut fleet = Fleet::start_with("8s").await;
    fleet.set_mode(serde_json::json!({ "mode": "hang" })).await;
    let url = fleet.url(0);
    let bearer = fleet.bearers[0].clone();
    let hung = tokio::spawn(async move { get(&url, 0, &bearer).await });
    // The stand-in has the mint: the replica took the lock before calling.
    let deadline = std::time::Instant::now() + testkit::WAIT;
    while fleet.record().await["calls"].as_u64() != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "no mint reached GitHub"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut connection = fleet.redis.connection();
    let locks: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}lock:*", fleet.prefix))
        .query(&mut connection)
        .expect("KEYS");
    assert_eq!(locks.len(), 1, "replica A holds the mint lock");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&locks[0])
        .query(&mut connection)
        .expect("PTTL");
    assert!(pttl > 0, "the lock expires: {pttl}");

    let a = fleet.replicas[0].take().expect("replica A");
    a.signal(Signal::SIGKILL);
    let _ = hung.await;
    fleet
        .set_mode(serde_json::json!({ "issue_secs": LIFE_SECS }))
        .await;

    let pttl: i64 = redis::cmd("PTTL")
        .arg(&locks[0])
        .query(&mut connection)
        .expect("PTTL");
    assert!(pttl > 0, "the dead replica's lock is still held: {pttl}");
    // Workspaces 4 and 8 share grant 0 with workspace 0.
    let (b, c) = tokio::join!(fleet.get(1, 4), fleet.get(2, 8));
    assert_eq!((b.status, c.status), (200, 200), "{b:?} {c:?}");
    assert_eq!(b.token, c.token, "one mint after the lock expired");
    assert_eq!(fleet.issued().await, 1);
    let text = metrics(&fleet.url(1)).await + &metrics(&fleet.url(2)).await;
    assert!(
        text.contains("molecule_platform_shared_cache_total{event=\"waited\"}"),
        "{text}"
    );
    drop(a);
    fleet.assert_quiet(&[b.token.unwrap()].into_iter().collect());
}

/// End to end through a real load balancer: 100 workspaces → HAProxy
/// (round robin) → 3 replicas → Redis → the stand-in, over two token
/// lifetimes: each replica serves part of the fleet, GitHub issues one
/// token per grant per lifetime, and a refusal through the balancer is
/// never served again whichever replica answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_a_load_balancer_one_mint_per_grant_and_refusals_hold() {
    let fleet = Fleet::start().await;
    let backends: Vec<String> = (0..REPLICAS)
        .map(|r| fleet.url(r).trim_start_matches("http://").to_owned())
        .collect();
    let balancer = testkit::HaProxy::start(&backends);
    let lb = balancer.url();
    let round = || async {
        let mut tasks = tokio::task::JoinSet::new();
        for ws in 0..WORKSPACES {
            let (lb, bearer) = (lb.clone(), fleet.bearers[ws].clone());
            tasks.spawn(async move { (ws, get(&lb, ws, &bearer).await) });
        }
        let mut served = vec![None; WORKSPACES];
        while let Some(done) = tasks.join_next().await {
            let (ws, answer) = done.expect("task");
            served[ws] = Some(answer);
        }
        served
            .into_iter()
            .map(|s| s.expect("answered"))
            .collect::<Vec<_>>()
    };
    let mut all = BTreeSet::new();
    let first = round().await;
    let by_grant = tokens_by_grant(&first);
    assert!(by_grant.iter().all(|t| t.len() == 1), "{by_grant:?}");
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(fleet.issued().await, GRANTS.len() as u64);
    until_refresh(&first).await;
    let second = round().await;
    let by_grant = tokens_by_grant(&second);
    assert!(by_grant.iter().all(|t| t.len() == 1), "{by_grant:?}");
    all.extend(by_grant.iter().flatten().cloned());
    assert_eq!(fleet.issued().await, 2 * GRANTS.len() as u64);
    for replica in 0..REPLICAS {
        let text = metrics(&fleet.url(replica)).await;
        assert!(
            metric(
                &text,
                "molecule_platform_tokens_served_total{caller=\"workspace\"} "
            ) > 0,
            "replica {replica} served part of the fleet"
        );
    }

    // A refusal through the balancer: no replica serves that token again.
    let refused = by_grant[2].first().unwrap().clone();
    let response = refuse(&lb, 2, &fleet.bearers[2], &refused).await;
    assert_eq!(response.status().as_u16(), 204);
    let third = round().await;
    let by_grant = tokens_by_grant(&third);
    assert!(
        !by_grant[2].contains(&refused),
        "the refused token came back"
    );
    assert!(by_grant.iter().all(|t| t.len() == 1), "{by_grant:?}");
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(fleet.issued().await, 2 * GRANTS.len() as u64 + 1);
    fleet.assert_quiet(&all);
}

/// A Redis that stops answering (SIGSTOP) costs each replica one deadline,
/// then each serves from and mints into its own cache, and shares again
/// once it answers; a "Redis" that answers garbage (an HTTP server) is the
/// same: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_or_garbage_answering_redis_fails_no_request() {
    let fleet = Fleet::start().await;
    let grants = GRANTS.len() as u64;
    let mut all = BTreeSet::new();
    let served = fleet.round().await;
    all.extend(tokens_by_grant(&served).into_iter().flatten());
    assert_eq!(fleet.issued().await, grants);

    fleet.redis.signal(Signal::SIGSTOP);
    until_refresh(&served).await;
    let stalled = fleet.round().await;
    let by_grant = tokens_by_grant(&stalled);
    assert!(
        by_grant.iter().all(|t| t.len() == REPLICAS),
        "each replica minted its own: {by_grant:?}"
    );
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(fleet.issued().await, grants + grants * REPLICAS as u64);
    fleet.redis.signal(Signal::SIGCONT);
    for replica in 0..REPLICAS {
        let stderr = fleet.replicas[replica]
            .as_ref()
            .unwrap()
            .wait_for_stderr("answering again");
        assert_eq!(
            stderr
                .matches("serving from and minting into this replica's own cache")
                .count(),
            1,
            "replica {replica}: one line for the episode:\n{stderr}"
        );
    }
    until_refresh(&stalled).await;
    let back = fleet.round().await;
    let by_grant = tokens_by_grant(&back);
    assert!(by_grant.iter().all(|t| t.len() == 1), "{by_grant:?}");
    all.extend(by_grant.into_iter().flatten());
    assert_eq!(fleet.issued().await, 2 * grants + grants * REPLICAS as u64);

    // An HTTP server where Redis should be: garbage answers, no failure.
    let garbage_url = fleet.stand_in_url.replacen("http://", "redis://", 1);
    let confused = fleet.spawn_replica_with(&fleet.key_file, &garbage_url);
    for ws in 0..GRANTS.len() {
        let answer = get(&confused.url(), ws, &fleet.bearers[ws]).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        all.insert(answer.token.expect("token"));
    }
    let text = metrics(&confused.url()).await;
    assert!(
        metric(
            &text,
            "molecule_platform_shared_cache_total{event=\"fallback\"} "
        ) >= 1,
        "{text}"
    );
    let secrets: Vec<String> = all.iter().cloned().collect();
    assert_no_secrets("confused replica stderr", &confused.stderr(), &secrets);
    fleet.assert_quiet(&all);
}

/// A refusal reported to a replica that never resolved the token's owner
/// still removes the fleet's entry: the installations table is shared, so
/// that replica finds the installation without asking GitHub, and no
/// replica serves the refused token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_on_a_replica_that_never_resolved_the_owner_is_never_served_again() {
    let fleet = Fleet::start().await;
    // Workspaces 2, 6 and 10 have grant 2 (acme-labs/*); only replica 1
    // resolves acme-labs, and replica 0 has answered nothing at all.
    let first = fleet.get(1, 2).await;
    assert_eq!(first.status, 200);
    let refused = first.token.clone().expect("token");
    let listings = fleet.record().await["listings"].as_u64().expect("listings");
    assert_eq!(fleet.issued().await, 1);

    let response = refuse(&fleet.url(0), 6, &fleet.bearers[6], &refused).await;
    assert_eq!(response.status().as_u16(), 204);

    let mut tokens = BTreeSet::from([refused.clone()]);
    let mut next = None;
    for (replica, ws) in [(1, 2), (2, 6), (0, 10), (1, 14)] {
        let answer = fleet.get(replica, ws).await;
        assert_eq!(answer.status, 200, "replica {replica}");
        let token = answer.token.expect("token");
        assert_ne!(token, refused, "replica {replica} served the refused token");
        if let Some(next) = &next {
            assert_eq!(&token, next, "one new token for the fleet");
        }
        next = Some(token.clone());
        tokens.insert(token);
    }
    assert_eq!(fleet.issued().await, 2, "one new mint for the fleet");
    assert_eq!(
        fleet.record().await["listings"].as_u64(),
        Some(listings),
        "replicas 0 and 2 took the installations table from Redis"
    );
    fleet.assert_quiet(&tokens);
}

/// A rate limit GitHub gives one replica holds the whole fleet: until it
/// ends no replica sends GitHub anything (the stand-in records any request
/// during a limit as a violation), workspaces needing a new token get 503
/// with `Retry-After` from every replica, and after it they get tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_given_to_one_replica_holds_every_replica_until_it_ends() {
    let fleet = Fleet::start().await;
    let answer = http()
        .put(format!("{}/_stand-in/rate-limit", fleet.stand_in_url))
        .header("content-type", "application/json")
        .body(r#"{"kind": "secondary", "secs": 3}"#)
        .send()
        .await
        .expect("rate limit");
    assert_eq!(answer.status().as_u16(), 204);

    // Replica 0 is told; replicas 1 and 2 then need GitHub for other grants.
    let mut waits = Vec::new();
    for (replica, ws) in [(0, 0), (1, 1), (2, 2)] {
        let response = http()
            .get(format!(
                "{}/workspaces/ws-{ws}/github-installation-token?owner={}",
                fleet.url(replica),
                GRANTS[ws % GRANTS.len()].0
            ))
            .bearer_auth(&fleet.bearers[ws])
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 503, "replica {replica}");
        let wait: u64 = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("replica {replica}: a Retry-After in seconds"));
        assert!((1..=4).contains(&wait), "replica {replica}: {wait}");
        waits.push(wait);
    }
    let record = fleet.record().await;
    assert_eq!(
        record["requests"].as_array().map(Vec::len),
        Some(1),
        "only replica 0's request reached GitHub: {record}"
    );
    assert_eq!(fleet.issued().await, 0);

    // Retry-After is the signal: after it, every replica gets its token.
    let longest = waits.into_iter().max().expect("waits");
    tokio::time::sleep(Duration::from_secs(longest)).await;
    for (replica, ws) in [(0, 0), (1, 1), (2, 2)] {
        assert_eq!(
            fleet.get(replica, ws).await.status,
            200,
            "replica {replica}: {}",
            fleet.replicas[replica].as_ref().unwrap().stderr()
        );
    }
    let record = fleet.record().await;
    assert_eq!(
        record["violations"],
        serde_json::json!([]),
        "no request during the limit: {record}"
    );
    fleet.assert_quiet(&BTreeSet::new());
}
