//! Refusals across replicas: a token refused on one replica is dropped on
//! all of them (published on one channel), and a workspace's refusal
//! reports are limited once for the fleet.

use std::sync::{PoisonError, Weak};
use std::time::Duration;

use rand::Rng;
use redis::AsyncCommands;

use super::{SharedStore, hex};

/// Called with the SHA-256 of each token refused on any replica.
pub(super) type RefusalListener = Box<dyn Fn(&[u8; 32]) + Send + Sync>;

impl SharedStore {
    fn refusal_channel(&self) -> String {
        format!("{}refused", self.prefix)
    }

    /// Calls `listener` with the SHA-256 of every token refused on any
    /// replica (including this one).
    pub fn on_refusal(&self, listener: impl Fn(&[u8; 32]) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(listener));
    }

    fn refused(&self, sha256: &[u8; 32]) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            listener(sha256);
        }
    }

    /// Claims the fleet's refusal window of (`workspace`, `installation`)
    /// for `interval`: `None` when claimed (or Redis is unusable: each
    /// replica's own limit still holds), else how long until it frees.
    /// The key names the workspace by the first 128 bits of its SHA-256.
    pub async fn claim_refusal(
        &self,
        workspace: &str,
        installation: u64,
        interval: Duration,
    ) -> Option<Duration> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(workspace.as_bytes());
        let key = format!(
            "{}refusal:{}:{installation}",
            self.prefix,
            hex(&digest[..16])
        );
        let millis = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        let claimed: Option<String> = self
            .op("SET NX (refusal window)", async {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut connection)
                    .await
            })
            .await
            .ok()?;
        if claimed.is_some() {
            return None;
        }
        let left: i64 = self
            .op("PTTL", async {
                redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
            })
            .await
            .unwrap_or(0);
        Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }

    /// Tells every replica (this one too) to drop the token of `sha256`.
    pub async fn announce(&self, sha256: &[u8; 32]) {
        let mut connection = self.connection.clone();
        let channel = self.refusal_channel();
        let message = hex(sha256);
        let _ = self
            .op::<i64, _>("PUBLISH", connection.publish(&channel, message))
            .await;
        // Our own subscriber hears it too; dropping here as well keeps this
        // replica right when the subscriber is disconnected.
        self.refused(sha256);
    }
}

/// The subscriber loop: listens on the refusal channel, reconnecting with
/// back-off and jitter while the store lives.
pub(super) async fn subscribe_forever(store: Weak<SharedStore>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (client, channel, op_timeout) = match store.upgrade() {
            Some(s) => (s.client.clone(), s.refusal_channel(), s.op_timeout),
            None => return,
        };
        let connected = tokio::time::timeout(op_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            backoff = Duration::from_millis(200);
            let mut messages = pubsub.into_on_message();
            loop {
                let next = std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(std::pin::Pin::new(&mut messages), cx)
                })
                .await;
                let Some(message) = next else { break };
                let Some(store) = store.upgrade() else { return };
                let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                if let Some(sha256) = credd_core::secret::parse_sha256_hex(&payload) {
                    store.refused(&sha256);
                }
            }
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
