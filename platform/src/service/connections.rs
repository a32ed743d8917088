//! Which connections are open, what each is doing, and who goes when the
//! cap is reached.
//!
//! Why: a connection costs a slot under [`ServiceLimits::max_connections`]
//! whether or not its client ever sends a request. Slowloris clients trickle
//! a request head one byte at a time and reconnect as soon as they are cut
//! off; if slots were handed out first come, first served (or the listener
//! stopped accepting at the cap), a few thousand of them would lock real
//! clients out. So every connection has a [`Phase`] and a deadline:
//!
//! - a new connection must deliver a complete request head within
//!   [`ServiceLimits::header_read_timeout`] (or the idle timeout, if shorter);
//! - a kept-alive connection between requests may idle for
//!   [`ServiceLimits::idle_timeout`], and once the first byte of its next head
//!   arrives, that head must be complete within the header timeout;
//! - a connection whose request is being handled has no deadline here (the
//!   request timeout bounds the handler).
//!
//! At the cap, a new connection evicts the connection that has been waiting
//! longest for a head (new, idle or mid-head). A real client's head arrives
//! microseconds after it connects, so it is never the oldest; when every
//! connection is in a request, the new one is refused (closed at once).
//! Timeouts, evictions and refusals are counted and reported in one warning
//! per [`LOG_SUMMARY_INTERVAL`], never one line per connection and never
//! with request content.
//!
//! Requests refused for a missing or wrong bearer (401) are reported the
//! same way ([`AuthRefusals`]): one warning per interval with the counts,
//! not one per request — a stranger on one connection could otherwise
//! write thousands of lines a second into the operator's log.
//!
//! One mutex guards the table; it is taken on accept, when a request starts
//! or ends, and when a kept-alive connection starts its next head.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ServiceLimits;

/// How often each summary may be logged: of slow clients (timeouts,
/// evictions, refused connections) and of unauthenticated requests.
pub const LOG_SUMMARY_INTERVAL: Duration = credd_core::log_limit::LOG_INTERVAL;

/// Most workspace IDs one summary of unauthenticated requests names.
const MOST_WORKSPACES_NAMED: usize = 8;

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepted; its first request head is not complete yet.
    Fresh,
    /// Kept alive between requests; nothing of the next head read yet.
    Idle,
    /// Kept alive, and part of the next head has arrived.
    Head,
    /// A request is being handled.
    Busy,
}

struct Slot {
    phase: Phase,
    /// When the connection is closed unless its phase changes first.
    deadline: Option<Instant>,
    /// Key in [`Table::waiting`] while the connection can be evicted.
    waiting: Option<u64>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    slots: HashMap<u64, Slot>,
    /// Connections that can be evicted, oldest first: sequence number of
    /// when they started waiting for a head → connection id.
    waiting: BTreeMap<u64, u64>,
    next_id: u64,
    next_seq: u64,
}

impl Table {
    fn start_waiting(&mut self, id: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.insert(seq, id);
        seq
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        if let Some(seq) = slot.waiting {
            self.waiting.remove(&seq);
        }
        Some(slot)
    }

    /// Evicts the connection that has waited longest for a head.
    fn evict_oldest(&mut self) -> bool {
        let Some((_, id)) = self.waiting.pop_first() else {
            return false;
        };
        if let Some(mut slot) = self.slots.remove(&id) {
            slot.waiting = None;
            slot.wake.notify_one();
        }
        true
    }
}

/// Counts of what slow clients caused since the last report.
#[derive(Default)]
struct SlowClients {
    head_timeouts: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    fd_exhausted: AtomicU64,
}

/// Requests refused for their bearer (401) since the last report: what the
/// handlers count instead of logging each (they find it in the request's
/// extensions, put there by the server loop).
#[derive(Default)]
pub(super) struct AuthRefusals {
    missing_bearer: AtomicU64,
    invalid_bearer: AtomicU64,
    named: Mutex<NamedWorkspaces>,
}

/// The workspace IDs refused requests named: the first few, and how many
/// requests named others.
#[derive(Default)]
struct NamedWorkspaces {
    sample: BTreeSet<String>,
    others: u64,
}

impl AuthRefusals {
    /// Counts one refused request: without a bearer (`missing`) or with
    /// one that matches nothing allowed on its route, naming `workspace`
    /// (a valid ID, or a placeholder) on a workspace route.
    pub(super) fn count(&self, missing: bool, workspace: Option<&str>) {
        let counter = if missing {
            &self.missing_bearer
        } else {
            &self.invalid_bearer
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(workspace) = workspace {
            let mut named = self.named.lock().unwrap_or_else(PoisonError::into_inner);
            if named.sample.contains(workspace) {
                return;
            }
            if named.sample.len() < MOST_WORKSPACES_NAMED {
                named.sample.insert(workspace.to_owned());
            } else {
                named.others += 1;
            }
        }
    }

    /// Logs one summary of what was counted since the last call.
    fn report(&self) {
        let missing_bearer = self.missing_bearer.swap(0, Ordering::Relaxed);
        let invalid_bearer = self.invalid_bearer.swap(0, Ordering::Relaxed);
        let named = std::mem::take(&mut *self.named.lock().unwrap_or_else(PoisonError::into_inner));
        if missing_bearer + invalid_bearer == 0 {
            return;
        }
        let workspaces = named.sample.into_iter().collect::<Vec<_>>().join(", ");
        let others = named.others;
        let named = match (workspaces.is_empty(), others) {
            (true, _) => String::new(),
            (false, 0) => format!("; workspaces named: {workspaces}"),
            (false, n) => format!("; workspaces named: {workspaces} and others in {n} request(s)"),
        };
        tracing::warn!(
            missing_bearer,
            invalid_bearer,
            "unauthenticated requests (last {}): {} refused with 401, {missing_bearer} without a bearer and {invalid_bearer} with a bearer that matches nothing allowed on the route{named}",
            humantime::format_duration(LOG_SUMMARY_INTERVAL),
            missing_bearer + invalid_bearer,
        );
    }
}

/// The open connections of one server.
pub(super) struct Connections {
    table: Mutex<Table>,
    max: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
    slow: SlowClients,
    auth_refusals: Arc<AuthRefusals>,
}

/// What the connection's task should do after its deadline passed.
pub(super) enum Expiry {
    /// The phase changed in the meantime: look at the new deadline.
    NotYet,
    /// Closed: its head (or its idle time) took too long.
    Close,
}

impl Connections {
    pub(super) fn new(limits: &ServiceLimits) -> Self {
        Self {
            table: Mutex::default(),
            max: limits.max_connections.max(1),
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            slow: SlowClients::default(),
            auth_refusals: Arc::default(),
        }
    }

    /// Where this server's handlers count unauthenticated requests.
    pub(super) fn auth_refusals(&self) -> &Arc<AuthRefusals> {
        &self.auth_refusals
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection, evicting the one that has waited longest
    /// for a head when the cap is reached. `None`: every connection is in a
    /// request, close this one.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Arc<ConnHandle>> {
        let now = Instant::now();
        let mut table = self.lock();
        if table.slots.len() >= self.max {
            if table.evict_oldest() {
                self.slow.evicted.fetch_add(1, Ordering::Relaxed);
            } else {
                self.slow.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let seq = table.start_waiting(id);
        let wake = Arc::new(Notify::new());
        table.slots.insert(
            id,
            Slot {
                phase: Phase::Fresh,
                deadline: Some(now + self.header_timeout.min(self.idle_timeout)),
                waiting: Some(seq),
                wake: Arc::clone(&wake),
            },
        );
        Some(Arc::new(ConnHandle {
            id,
            connections: Arc::clone(self),
            idle: AtomicBool::new(false),
            wake,
        }))
    }

    /// Frees a slot when the open-file limit stops `accept`: evicts the
    /// connection that has waited longest for a head, if any.
    pub(super) fn evict_for_fd(&self) -> bool {
        self.slow.fd_exhausted.fetch_add(1, Ordering::Relaxed);
        let evicted = self.lock().evict_oldest();
        if evicted {
            self.slow.evicted.fetch_add(1, Ordering::Relaxed);
        }
        evicted
    }

    /// Logs one summary of what slow clients caused since the last call,
    /// and one of unauthenticated requests (each only if there was any).
    pub(super) fn report(&self) {
        self.auth_refusals.report();
        let take = |n: &AtomicU64| n.swap(0, Ordering::Relaxed);
        let head_timeouts = take(&self.slow.head_timeouts);
        let evicted = take(&self.slow.evicted);
        let refused = take(&self.slow.refused);
        let fd_exhausted = take(&self.slow.fd_exhausted);
        if head_timeouts + evicted + refused + fd_exhausted == 0 {
            return;
        }
        tracing::warn!(
            head_timeouts,
            evicted,
            refused,
            fd_exhausted,
            "slow clients (last {}): {head_timeouts} connection(s) closed without a complete request head within {}, {evicted} evicted at the cap of {} connections or the open-file limit, {refused} refused while every connection was in a request, {fd_exhausted} accept(s) hit the open-file limit",
            humantime::format_duration(LOG_SUMMARY_INTERVAL),
            humantime::format_duration(self.header_timeout),
            self.max,
        );
    }
}

/// One connection's registration; dropping it frees the slot.
pub(super) struct ConnHandle {
    id: u64,
    connections: Arc<Connections>,
    /// Whether the phase is [`Phase::Idle`] (read without the lock on every
    /// read, to notice the first byte of the next head).
    idle: AtomicBool,
    wake: Arc<Notify>,
}

impl ConnHandle {
    /// Signalled when the deadline moved earlier or the connection was
    /// evicted.
    pub(super) fn wake(&self) -> &Notify {
        &self.wake
    }

    /// The current deadline: `None` when evicted (close now), `Some(None)`
    /// while a request is being handled.
    pub(super) fn deadline(&self) -> Option<Option<Instant>> {
        let table = self.connections.lock();
        table.slots.get(&self.id).map(|slot| slot.deadline)
    }

    /// Called when the deadline passed: closes (and counts) the connection
    /// unless its phase moved on.
    pub(super) fn expire(&self) -> Expiry {
        let now = Instant::now();
        let mut table = self.connections.lock();
        let Some(slot) = table.slots.get(&self.id) else {
            return Expiry::Close;
        };
        match slot.deadline {
            Some(deadline) if deadline <= now => {
                let phase = slot.phase;
                table.remove(self.id);
                drop(table);
                if matches!(phase, Phase::Fresh | Phase::Head) {
                    self.connections
                        .slow
                        .head_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("closing a connection: no complete request head in time");
                } else {
                    tracing::debug!("closing a kept-alive connection idle for too long");
                }
                Expiry::Close
            }
            _ => Expiry::NotYet,
        }
    }

    /// A complete request head arrived: no deadline until it is answered.
    fn request_started(&self) {
        let mut table = self.connections.lock();
        let Some(slot) = table.slots.get_mut(&self.id) else {
            return;
        };
        slot.phase = Phase::Busy;
        slot.deadline = None;
        self.idle.store(false, Ordering::Relaxed);
        if let Some(seq) = slot.waiting.take() {
            table.waiting.remove(&seq);
        }
    }

    /// The answer is on its way: idle (and evictable) until the next head.
    fn request_finished(&self) {
        let now = Instant::now();
        let mut table = self.connections.lock();
        if !table.slots.contains_key(&self.id) {
            return;
        }
        let seq = table.start_waiting(self.id);
        if let Some(slot) = table.slots.get_mut(&self.id) {
            slot.phase = Phase::Idle;
            slot.deadline = Some(now + self.connections.idle_timeout);
            slot.waiting = Some(seq);
            self.idle.store(true, Ordering::Relaxed);
            slot.wake.notify_one();
        }
    }

    /// Bytes arrived on an idle kept-alive connection: its next head has
    /// begun and must be complete within the header timeout.
    fn head_started(&self) {
        let now = Instant::now();
        let mut table = self.connections.lock();
        let Some(slot) = table.slots.get_mut(&self.id) else {
            return;
        };
        if slot.phase == Phase::Idle {
            slot.phase = Phase::Head;
            slot.deadline = Some(now + self.connections.header_timeout);
            slot.wake.notify_one();
        }
        self.idle.store(false, Ordering::Relaxed);
    }

    /// Marks the connection busy until the guard is dropped (the handler's
    /// future completed or was dropped).
    pub(super) fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.request_started();
        RequestGuard(Arc::clone(self))
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.connections.lock().remove(self.id);
    }
}

/// Keeps a connection [`Phase::Busy`] while alive.
pub(super) struct RequestGuard(Arc<ConnHandle>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A TCP stream that tells its [`ConnHandle`] when a kept-alive connection
/// starts sending its next request.
pub(super) struct ConnIo {
    stream: TcpStream,
    handle: Arc<ConnHandle>,
}

impl ConnIo {
    pub(super) fn new(stream: TcpStream, handle: Arc<ConnHandle>) -> Self {
        Self { stream, handle }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before && this.handle.idle.load(Ordering::Relaxed) {
            this.handle.head_started();
        }
        result
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize) -> ServiceLimits {
        ServiceLimits {
            max_connections,
            ..ServiceLimits::default()
        }
    }

    #[test]
    fn at_the_cap_the_longest_waiting_connection_is_evicted() {
        let connections = Arc::new(Connections::new(&limits(3)));
        let a = connections.admit().expect("a");
        let b = connections.admit().expect("b");
        let c = connections.admit().expect("c");
        // a is in a request, b waits longest, c after it.
        let _busy = a.start_request();
        let d = connections.admit().expect("d evicts b");
        assert_eq!(b.deadline(), None, "b evicted");
        assert!(a.deadline().is_some() && c.deadline().is_some());
        // c finishes a request and is idle: now d waits longest.
        let guard = c.start_request();
        drop(guard);
        let _e = connections.admit().expect("e evicts d");
        assert_eq!(d.deadline(), None, "d evicted");
        assert!(c.deadline().is_some(), "c idled after d started waiting");
    }

    #[test]
    fn when_every_connection_is_in_a_request_new_ones_are_refused() {
        let connections = Arc::new(Connections::new(&limits(2)));
        let a = connections.admit().expect("a");
        let b = connections.admit().expect("b");
        let (_ga, _gb) = (a.start_request(), b.start_request());
        assert!(connections.admit().is_none());
        drop(_ga);
        assert!(connections.admit().is_some(), "a idles and can be evicted");
    }

    #[test]
    fn unauthenticated_counts_name_a_bounded_sample_of_workspaces() {
        let tally = AuthRefusals::default();
        for i in 0..20 {
            tally.count(false, Some(&format!("ws-{:02}", i % 10)));
        }
        tally.count(true, None);
        assert_eq!(tally.invalid_bearer.load(Ordering::Relaxed), 20);
        assert_eq!(tally.missing_bearer.load(Ordering::Relaxed), 1);
        {
            let named = tally.named.lock().unwrap();
            assert_eq!(named.sample.len(), MOST_WORKSPACES_NAMED);
            assert_eq!(named.others, 4, "ws-08 and ws-09, twice each");
        }
        tally.report();
        assert_eq!(tally.invalid_bearer.load(Ordering::Relaxed), 0, "reset");
        assert!(tally.named.lock().unwrap().sample.is_empty(), "reset");
    }

    #[test]
    fn dropping_a_handle_frees_its_slot() {
        let connections = Arc::new(Connections::new(&limits(1)));
        let a = connections.admit().expect("a");
        let _busy = a.start_request();
        assert!(connections.admit().is_none());
        drop(_busy);
        drop(a);
        let b = connections.admit().expect("slot free");
        let _busy = b.start_request();
        assert!(connections.admit().is_none(), "no stale entry was evicted");
    }
}
