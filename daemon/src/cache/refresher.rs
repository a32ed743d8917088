//! The refresher: the one task that calls the platform.
//!
//! It sleeps until the schedule says so or something wakes it (a client
//! that found no usable token, SIGHUP), makes the call, and hands the
//! outcome to the state's transitions ([`super::state`]). Being the only
//! caller is what makes any number of clients cost one call.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::{Deadline, Failure};
use super::{Fetch, TokenCache};

impl<F: Fetch> TokenCache<F> {
    /// The refresher: the only caller of the platform. Runs until `cancel`.
    pub(crate) async fn run_refresher(&self, cancel: CancellationToken) {
        loop {
            let next = self.lock().next_attempt;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {
                    if !self.take_request() {
                        continue;
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    // An erase or request may have moved the schedule meanwhile.
                    if Instant::now() < self.lock().next_attempt {
                        continue;
                    }
                }
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = self.attempt() => {}
            }
        }
    }

    /// Decides whether an out-of-schedule request leads to a call now.
    fn take_request(&self) -> bool {
        let go = self.lock().take_request(&self.policy, self.now());
        if !go {
            // Waiting clients re-check whether anything can happen before their deadline.
            self.bump();
        }
        go
    }

    /// One platform call and its consequences for the schedule.
    async fn attempt(&self) {
        let sent = self.now();
        let sent_at = Deadline {
            mono: sent.mono,
            boot: sent.boot,
        };
        {
            let mut st = self.lock();
            st.in_flight = true;
            st.requested = None;
            st.platform_calls += 1;
        }
        self.bump();
        tracing::debug!("calling the platform");
        let result = self.fetcher.fetch().await;
        let now = self.now();
        let unit = rand::random::<f64>();
        let mut st = self.lock();
        st.in_flight = false;
        let fresh = match result {
            Ok(grant) => st.accept(&self.policy, grant, sent_at, now, unit),
            Err(error) => {
                st.fail(&self.policy, &Failure::Platform(&error), now, unit);
                None
            }
        };
        drop(st);
        self.bump();
        if let (Some(token), Some(hook)) = (fresh, &self.on_refresh) {
            hook(&token);
        }
    }
}
