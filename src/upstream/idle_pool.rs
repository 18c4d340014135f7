//! Idle HTTP/1 upstream connections of API calls, kept per peer for reuse.
//!
//! Pingora's pool spawns a task per released connection to watch it, and a reuse has to wake
//! that task and wait for it to hand the connection back; with the peer-address check on
//! reuse (a `getpeername`) that was about 9k instructions and a syscall per call (callgrind,
//! S3). Here a released connection is pushed on a list, and taking one pops it and checks it
//! with a read that must not complete. One sweeper task per pool closes connections that
//! expired or that the upstream closed while idle, so they do not linger in `CLOSE_WAIT`.

use futures::FutureExt;
use pingora::protocols::Stream;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Idle connections kept per peer; the oldest is closed to make room.
pub const IDLE_PER_PEER: usize = 128;

/// How often the sweeper looks for dead or expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One idle connection and when it stops being reusable.
struct Idle {
    stream: Stream,
    until: Option<Instant>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u <= now)
    }
}

/// (foldhash: looked up twice per call; the keys are already hashes.)
type Lists = HashMap<u64, Vec<Idle>, foldhash::fast::RandomState>;

/// Idle connections by peer key (Pingora's `reuse_hash`), newest last.
#[derive(Default)]
pub struct IdlePool {
    lists: Arc<Mutex<Lists>>,
    sweeping: AtomicBool,
}

impl IdlePool {
    /// An empty pool; its sweeper starts with the first released connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hot path: the newest usable idle connection to `key`, if any. Expired or dead ones met
    /// on the way are closed.
    pub fn take(&self, key: u64) -> Option<Stream> {
        let now = Instant::now();
        loop {
            let mut idle = {
                let mut lists = self.lists.lock().unwrap_or_else(|e| e.into_inner());
                let list = lists.get_mut(&key)?;
                let idle = list.pop()?;
                if idle.expired(now) {
                    // Older ones expired too: the list is in release order.
                    let dead = std::mem::take(list);
                    drop(lists);
                    drop(dead);
                    return None;
                }
                idle
            };
            if is_quiet(&mut idle.stream) {
                return Some(idle.stream);
            }
        }
    }

    /// Hot path: keeps `stream` for reuse for `idle` (no limit when `None`).
    pub fn put(&self, key: u64, stream: Stream, idle: Option<Duration>) {
        let now = Instant::now();
        let until = idle.map(|d| now + d);
        let closed = {
            let mut lists = self.lists.lock().unwrap_or_else(|e| e.into_inner());
            let list = lists.entry(key).or_default();
            let expired = list.iter().take_while(|i| i.expired(now)).count();
            let over = (list.len() - expired + 1).saturating_sub(IDLE_PER_PEER);
            let closed: Vec<Idle> = list.drain(..expired + over).collect();
            list.push(Idle { stream, until });
            closed
        };
        // Closing (deregistering and closing the socket) happens outside the lock.
        drop(closed);
        self.start_sweeper();
    }

    /// Idle connections kept for `key`.
    pub fn idle_count(&self, key: u64) -> usize {
        let lists = self.lists.lock().unwrap_or_else(|e| e.into_inner());
        lists.get(&key).map_or(0, Vec::len)
    }

    fn start_sweeper(&self) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(sweep_loop(Arc::downgrade(&self.lists)));
            }
            // Outside a runtime (not on the request path): the next release tries again.
            Err(_) => self.sweeping.store(false, Ordering::Release),
        }
    }
}

/// Closes dead and expired idle connections every `SWEEP_EVERY`, until the pool is dropped.
async fn sweep_loop(lists: Weak<Mutex<Lists>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(lists) = lists.upgrade() else {
            return;
        };
        sweep(&lists, Instant::now());
    }
}

/// Drops every idle connection that expired by `now` or is no longer quiet.
fn sweep(lists: &Mutex<Lists>, now: Instant) {
    let mut dead = Vec::new();
    {
        let mut lists = lists.lock().unwrap_or_else(|e| e.into_inner());
        for list in lists.values_mut() {
            let mut i = 0;
            while i < list.len() {
                if list[i].expired(now) || !is_quiet(&mut list[i].stream) {
                    dead.push(list.remove(i));
                } else {
                    i += 1;
                }
            }
        }
        lists.retain(|_, l| !l.is_empty());
    }
    drop(dead);
}

/// Whether an idle connection can carry a request: a read must find nothing to return. End of
/// stream means the upstream closed it; bytes mean a response nobody asked for.
fn is_quiet(stream: &mut Stream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    // Unconstrained: with the task's budget spent, the read would report "not ready" whatever
    // the socket holds.
    match tokio::task::unconstrained(stream.read(&mut byte)).now_or_never() {
        None => true,
        Some(Ok(0)) => {
            tracing::debug!("idle upstream connection was closed by the upstream");
            false
        }
        Some(Ok(_)) => {
            tracing::warn!("idle upstream connection had unexpected data; closed");
            false
        }
        Some(Err(e)) => {
            tracing::debug!("idle upstream connection broke: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: our side as a Pingora stream, and the server side.
    async fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), l.accept());
        let ours: pingora::protocols::l4::stream::Stream = ours.unwrap().into();
        (Box::new(ours), theirs.unwrap().0)
    }

    /// Lets the runtime's I/O driver see what the peer did.
    async fn settle() {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_newest_connection_is_reused_and_taken_once() {
        let pool = IdlePool::new();
        let (a, _ka) = pair().await;
        let (b, _kb) = pair().await;
        let b_id = b.id();
        pool.put(7, a, None);
        pool.put(7, b, None);
        assert_eq!(pool.idle_count(7), 2);
        assert!(
            pool.take(8).is_none(),
            "another peer's connections are not shared"
        );
        assert_eq!(pool.take(7).map(|s| s.id()), Some(b_id));
        assert!(pool.take(7).is_some());
        assert!(pool.take(7).is_none());
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let pool = IdlePool::new();
        let (a, ka) = pair().await;
        pool.put(1, a, None);
        drop(ka);
        settle().await;
        assert!(pool.take(1).is_none());
        assert_eq!(pool.idle_count(1), 0);
    }

    #[tokio::test]
    async fn a_connection_with_unasked_data_is_not_reused() {
        let pool = IdlePool::new();
        let (a, mut ka) = pair().await;
        pool.put(1, a, None);
        ka.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        settle().await;
        assert!(pool.take(1).is_none());
    }

    #[tokio::test]
    async fn expired_connections_are_closed_not_reused() {
        let pool = IdlePool::new();
        let (a, _ka) = pair().await;
        let (b, _kb) = pair().await;
        pool.put(1, a, Some(Duration::from_millis(10)));
        pool.put(1, b, Some(Duration::from_millis(10)));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(pool.take(1).is_none());
        assert_eq!(pool.idle_count(1), 0, "all expired ones are closed at once");
    }

    #[tokio::test]
    async fn the_oldest_is_closed_beyond_the_limit() {
        let pool = IdlePool::new();
        let mut keep = Vec::new();
        let mut first = None;
        for i in 0..IDLE_PER_PEER + 2 {
            let (s, k) = pair().await;
            if i == 2 {
                first = Some(s.id());
            }
            keep.push(k);
            pool.put(1, s, None);
        }
        assert_eq!(pool.idle_count(1), IDLE_PER_PEER);
        let mut left = Vec::new();
        while let Some(s) = pool.take(1) {
            left.push(s.id());
        }
        assert_eq!(left.last().copied(), first, "the two oldest went first");
    }

    #[tokio::test]
    async fn the_sweep_closes_dead_and_expired_connections_only() {
        let pool = IdlePool::new();
        let (alive, _k1) = pair().await;
        let (closed, k2) = pair().await;
        let (old, _k3) = pair().await;
        pool.put(1, alive, None);
        pool.put(2, closed, None);
        pool.put(3, old, Some(Duration::from_millis(10)));
        drop(k2);
        settle().await;
        sweep(&pool.lists, Instant::now());
        assert_eq!(
            (pool.idle_count(1), pool.idle_count(2), pool.idle_count(3)),
            (1, 0, 0)
        );
    }
}
