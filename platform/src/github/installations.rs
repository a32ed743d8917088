//! Which installation serves an owner: `GET /app/installations`, listed
//! page by page on the API's own origin, kept for [`INSTALLATIONS_TTL`],
//! one listing at a time and shared with other replicas.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::mint::describe_json_error;
use super::{
    GITHUB_API_VERSION, GitHubAppProvider, INSTALLATIONS_TTL, MAX_INSTALLATION_PAGES,
    MAX_LISTING_PAGE_BYTES, RELIST_AFTER_MISS, signed,
};
use crate::provider::{FAILURE_COOLDOWN, ProviderError};

/// One item of `GET /app/installations`, read leniently: GitHub's
/// `installation` has an `account` that is a user or organisation (with a
/// `login`), an enterprise (a `slug`, no `login`) or `null`. Only the first
/// can be an owner a grant names; the others are skipped, never a reason
/// to fail the listing.
#[derive(Deserialize)]
struct InstallationAnswer {
    id: u64,
    #[serde(default)]
    account: Option<serde_json::Value>,
}

/// Owner (lowercased) → installation, as last listed, and the last listing's
/// failure (shared by the requests that come within [`FAILURE_COOLDOWN`]).
#[derive(Default)]
pub(super) struct Directory {
    by_owner: HashMap<String, u64>,
    listed_at: Option<Timestamp>,
    /// Listings attempted, successful or not: a request that waited for
    /// another's listing takes its result instead of listing again.
    attempts: u64,
    failure: Option<(Timestamp, ProviderError)>,
}

impl Directory {
    /// What the table answers for `key` (`owner` lowercased) at `now`
    /// without listing: its installation while the table is fresh, "not
    /// installed" shortly after a listing that did not have it, the last
    /// listing's failure within [`FAILURE_COOLDOWN`] (the known
    /// installation, if any, still serves); `None` when a listing is due.
    fn lookup(&self, key: &str, owner: &str, now: Timestamp) -> Option<Result<u64, ProviderError>> {
        let fresh = |within: Duration| {
            self.listed_at
                .is_some_and(|at| now.duration_since(at) < signed(within))
        };
        let known = self.by_owner.get(key).copied();
        match known {
            Some(id) if fresh(INSTALLATIONS_TTL) => return Some(Ok(id)),
            None if fresh(RELIST_AFTER_MISS) => {
                return Some(Err(ProviderError::NotInstalled(owner.to_owned())));
            }
            _ => {}
        }
        match &self.failure {
            Some((at, error))
                if now.duration_since(*at) < signed(FAILURE_COOLDOWN) && error.stands_at(now) =>
            {
                Some(known.ok_or_else(|| error.clone()))
            }
            _ => None,
        }
    }
}

/// The shared record of the installations table.
const INSTALLATIONS_RECORD: &str = "github:installations";

/// The installations table as replicas share it.
#[derive(Serialize, Deserialize)]
struct SharedDirectory {
    /// When it was listed (Unix seconds, the lister's clock).
    listed_at: i64,
    by_owner: HashMap<String, u64>,
}

impl GitHubAppProvider {
    /// The installations table another replica listed, if it is no older
    /// than `INSTALLATIONS_TTL` (a lister's clock ahead of ours counts as
    /// now).
    pub(super) async fn shared_directory(&self) -> Option<(Timestamp, HashMap<String, u64>)> {
        let plain = self
            .shared
            .as_ref()?
            .get_record(INSTALLATIONS_RECORD)
            .await?;
        let record: SharedDirectory = serde_json::from_slice(&plain).ok()?;
        let now = self.now();
        let listed_at = Timestamp::from_second(record.listed_at).ok()?.min(now);
        let by_owner = record
            .by_owner
            .into_iter()
            .filter(|(owner, id)| {
                *id > 0
                    && credd_core::repository::is_valid_owner(owner)
                    && *owner == owner.to_ascii_lowercase()
            })
            .collect();
        (now.duration_since(listed_at) < signed(INSTALLATIONS_TTL)).then_some((listed_at, by_owner))
    }

    /// Shares the table this replica just listed.
    async fn share_directory(&self, listed_at: Timestamp, by_owner: HashMap<String, u64>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let record = SharedDirectory {
            listed_at: listed_at.as_second(),
            by_owner,
        };
        if let Ok(plain) = serde_json::to_vec(&record) {
            shared
                .put_record(INSTALLATIONS_RECORD, &plain, INSTALLATIONS_TTL)
                .await;
        }
    }

    pub(super) fn cached_installation(&self, owner: &str) -> Option<u64> {
        self.directory()
            .by_owner
            .get(&owner.to_ascii_lowercase())
            .copied()
    }

    /// GitHub said installation `id` does not exist: forget it and make the
    /// next request list installations at once.
    pub(super) async fn forget_installation(&self, id: u64) {
        {
            let mut directory = self.directory();
            directory.by_owner.retain(|_, known| *known != id);
            directory.listed_at = None;
            directory.failure = None;
        }
        if let Some(shared) = &self.shared {
            shared.remove_record(INSTALLATIONS_RECORD).await;
        }
    }

    /// The installation of `owner`, from the table when it is recent enough,
    /// else listed again: one listing at a time, and requests that waited
    /// for a listing (or come within [`FAILURE_COOLDOWN`] of a failed one)
    /// take its result instead of listing again.
    pub(super) async fn installation_of(&self, owner: &str) -> Result<u64, ProviderError> {
        let key = owner.to_ascii_lowercase();
        let seen = {
            let directory = self.directory();
            if let Some(answer) = directory.lookup(&key, owner, self.now()) {
                return answer;
            }
            directory.attempts
        };
        let _flight = self.listing.lock().await;
        {
            let directory = self.directory();
            // Someone listed while we waited: take that.
            if directory.attempts != seen
                && let Some(answer) = directory.lookup(&key, owner, self.now())
            {
                return answer;
            }
        }
        if let Some((listed_at, table)) = self.shared_directory().await {
            // Another replica listed recently: take its table.
            let mut directory = self.directory();
            if directory.listed_at.is_none_or(|at| at < listed_at) {
                directory.by_owner = table;
                directory.listed_at = Some(listed_at);
                directory.failure = None;
            }
            if let Some(answer) = directory.lookup(&key, owner, self.now()) {
                return answer;
            }
        }
        let listed = self.list_installations().await;
        let now = self.now();
        if let Ok(table) = &listed {
            self.share_directory(now, table.clone()).await;
        }
        let mut directory = self.directory();
        directory.attempts += 1;
        match listed {
            Ok(table) => {
                directory.by_owner = table;
                directory.listed_at = Some(now);
                directory.failure = None;
            }
            Err(error) => {
                directory.failure = Some((now, error.clone()));
                if let Some(id) = directory.by_owner.get(&key) {
                    tracing::warn!(
                        "[github] listing installations failed, using the known installation of {owner}: {error}"
                    );
                    return Ok(*id);
                }
                return Err(error);
            }
        }
        directory
            .by_owner
            .get(&key)
            .copied()
            .ok_or_else(|| ProviderError::NotInstalled(owner.to_owned()))
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every installation of the App on an account a grant can name, owner
    /// (lowercased) → id, following `Link: <…>; rel="next"` on the API's own
    /// origin only. Installations on an enterprise or without an account
    /// are skipped (counted in one log line per listing).
    async fn list_installations(&self) -> Result<HashMap<String, u64>, ProviderError> {
        let mut table = HashMap::new();
        let mut skipped = 0usize;
        let mut url = format!("{}/app/installations?per_page=100", self.api_url);
        for _ in 0..MAX_INSTALLATION_PAGES {
            self.check_hold()?;
            self.check_shared_hold().await?;
            let jwt = self.jwt(self.now())?;
            self.listings.fetch_add(1, Ordering::SeqCst);
            let response = self
                .http
                .get(&url)
                .bearer_auth(jwt.as_str())
                .header(reqwest::header::ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", GITHUB_API_VERSION)
                .send()
                .await
                .map_err(|e| self.classify(&e))?;
            drop(jwt);
            let status = response.status();
            let headers = response.headers().clone();
            let next = headers
                .get(reqwest::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = self.read_limited(response, MAX_LISTING_PAGE_BYTES).await?;
            if !status.is_success() {
                return Err(self
                    .upstream_error(status.as_u16(), &headers, &body, None)
                    .await);
            }
            if let Some((until, why)) = self.rate_limit_of(status.as_u16(), &headers, None) {
                // Used up by this very request: later pages wait.
                let _ = self.hold(until, why).await;
            }
            let page: Vec<serde_json::Value> =
                serde_json::from_slice(&body).map_err(|e| describe_json_error(&e))?;
            for item in page {
                let login = serde_json::from_value::<InstallationAnswer>(item)
                    .ok()
                    .and_then(|i| {
                        let login = i.account?.get("login")?.as_str()?.to_owned();
                        credd_core::repository::is_valid_owner(&login).then_some((login, i.id))
                    });
                match login {
                    Some((login, id)) => {
                        table.insert(login.to_ascii_lowercase(), id);
                    }
                    None => skipped += 1,
                }
            }
            match next {
                None => {
                    if skipped > 0 {
                        tracing::info!(
                            "[github] installations listed: {} usable, {skipped} skipped (an enterprise account, no account, or a login no grant can name)",
                            table.len()
                        );
                    }
                    return Ok(table);
                }
                Some(next) if next.starts_with(&format!("{}/", self.api_url)) => url = next,
                Some(_) => {
                    return Err(ProviderError::Malformed(
                        "the installations listing links to another host".into(),
                    ));
                }
            }
        }
        tracing::warn!(
            "[github] the App has more than {} installations: only the first {} pages are used",
            MAX_INSTALLATION_PAGES * 100,
            MAX_INSTALLATION_PAGES
        );
        Ok(table)
    }
}

/// The `rel="next"` target of a `Link` header.
pub(super) fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_owned())
    })
}
