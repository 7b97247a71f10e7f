//! The one accept loop every listener of the daemon runs (IMDS, metrics,
//! admin), so that all three follow the same rules:
//!
//! * **a permit per connection**, from a semaphore the caller sizes. Past
//!   it, a listener either waits before `accept()` (clients queue in the
//!   kernel's backlog and hold none of our descriptors: metrics, admin) or
//!   accepts and closes at once (IMDS: a job's SDK fails fast and tries
//!   again, rather than wait behind a flood);
//! * **backoff on errors**: `accept()` fails with `EMFILE` while the
//!   process is out of descriptors, and fails again at once for as long as
//!   a connection waits in the backlog. Retrying at once would spin on a
//!   core; the loop sleeps, from 10 ms doubling to 1 s, and starts again
//!   from 10 ms after the next success;
//! * **one log line** per listener and second at most, with how many were
//!   held back.

use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use super::ratelimit::RateLimit;

/// The first and the longest sleep after a failed `accept()`.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Something that accepts connections: a TCP or a Unix listener (or, in
/// tests, a scripted one).
pub trait Listener: Send {
    type Stream: Send + 'static;
    type Peer: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// What a listener does with a connection when no permit is left.
/// What a shed connection is handed to: the stream (closed when it
/// returns) and its peer.
pub type ShedFn<S, P> = Box<dyn Fn(S, &P) + Send>;

pub enum WhenFull<S, P> {
    /// Wait for a permit before accepting.
    Wait,
    /// Accept, hand it to `shed` (to count and log it, and let go of what
    /// it holds), and close it.
    Shed(ShedFn<S, P>),
}

impl<S, P> std::fmt::Debug for WhenFull<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Wait => "Wait",
            Self::Shed(_) => "Shed",
        })
    }
}

/// One listener's rules.
#[derive(Debug)]
pub struct Rules<S, P> {
    /// The listener's name in the log (`imds`, `metrics`, `admin`).
    pub name: &'static str,
    pub permits: Arc<Semaphore>,
    pub when_full: WhenFull<S, P>,
}

/// The backoff after consecutive failures.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::ZERO)
    }

    /// The sleep after one more failure.
    fn failed(&mut self) -> Duration {
        self.0 = if self.0.is_zero() {
            BACKOFF_FIRST
        } else {
            (self.0 * 2).min(BACKOFF_MAX)
        };
        self.0
    }

    fn succeeded(&mut self) {
        self.0 = Duration::ZERO;
    }
}

/// Accepts from `listener` until `shutdown` resolves, handing each
/// connection and its permit to `handle`, whose future runs as a task of
/// its own. Returns the tasks still running, for the caller to drain or
/// end.
pub async fn serve<L, H, F>(
    listener: L,
    rules: Rules<L::Stream, L::Peer>,
    shutdown: impl Future<Output = ()>,
    mut handle: H,
) -> JoinSet<()>
where
    L: Listener,
    H: FnMut(L::Stream, L::Peer, OwnedSemaphorePermit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let failures = RateLimit::new(1);
    let mut backoff = Backoff::new();
    let mut tasks = JoinSet::new();
    loop {
        let waited = match rules.when_full {
            WhenFull::Wait => tokio::select! {
                permit = rules.permits.clone().acquire_owned() => Some(permit.expect("never closed")),
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    report(rules.name, done);
                    continue;
                }
                () = &mut shutdown => break,
            },
            WhenFull::Shed(_) => None,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.succeeded();
                    let permit = match waited {
                        Some(permit) => permit,
                        None => match rules.permits.clone().try_acquire_owned() {
                            Ok(permit) => permit,
                            Err(_) => {
                                if let WhenFull::Shed(shed) = &rules.when_full {
                                    shed(stream, &peer);
                                }
                                continue;
                            }
                        },
                    };
                    tasks.spawn(handle(stream, peer, permit));
                }
                Err(e) => {
                    let pause = backoff.failed();
                    if let Some(suppressed) = failures.allow() {
                        tracing::warn!(listener = rules.name, error = %e, suppressed, retry_in_ms = pause.as_millis() as u64, "accept failed");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut shutdown => break,
                    }
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => report(rules.name, done),
            () = &mut shutdown => break,
        }
    }
    tasks
}

fn report(name: &'static str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(listener = name, error = %e, "connection task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Mutex,
        },
    };

    use super::*;

    /// A listener that plays a script: each call takes the next outcome,
    /// and fails with `EMFILE` once the script is done.
    struct Scripted {
        script: Mutex<VecDeque<io::Result<u32>>>,
        calls: Arc<AtomicUsize>,
    }

    impl Scripted {
        fn new(script: Vec<io::Result<u32>>) -> (Self, Arc<AtomicUsize>) {
            let calls = Arc::new(AtomicUsize::new(0));
            (
                Self {
                    script: Mutex::new(script.into()),
                    calls: calls.clone(),
                },
                calls,
            )
        }
    }

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    impl Listener for Scripted {
        type Stream = u32;
        type Peer = u32;
        // Taken when polled, as a real listener's accept() is cancel-safe:
        // a future dropped unpolled loses nothing.
        async fn accept(&self) -> io::Result<(u32, u32)> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.script.lock().unwrap().pop_front();
            next.unwrap_or_else(|| Err(emfile())).map(|n| (n, n))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_the_loop_backs_off_instead_of_spinning() {
        let (listener, calls) = Scripted::new(vec![]);
        let rules = Rules {
            name: "test",
            permits: Arc::new(Semaphore::new(4)),
            when_full: WhenFull::Wait,
        };
        serve(
            listener,
            rules,
            tokio::time::sleep(Duration::from_secs(10)),
            |_, _, _| async {},
        )
        .await;
        // 10 ms doubling to 1 s: 7 tries to reach the ceiling, then one a
        // second. A loop that retried at once would have made millions.
        let made = calls.load(Ordering::SeqCst);
        assert!((10..=20).contains(&made), "{made} accept calls in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_failures_stop_connections_are_served_and_the_backoff_starts_over() {
        let mut script: Vec<io::Result<u32>> = (0..20).map(|_| Err(emfile())).collect();
        script.extend([Ok(1), Ok(2), Err(emfile()), Ok(3)]);
        let (listener, _) = Scripted::new(script);
        let served = Arc::new(Mutex::new(Vec::new()));
        let rules = Rules {
            name: "test",
            permits: Arc::new(Semaphore::new(4)),
            when_full: WhenFull::Wait,
        };
        let started = tokio::time::Instant::now();
        let seen = served.clone();
        serve(
            listener,
            rules,
            tokio::time::sleep(Duration::from_secs(30)),
            move |n, _, _| {
                let seen = seen.clone();
                async move { seen.lock().unwrap().push((n, started.elapsed())) }
            },
        )
        .await;
        let served = served.lock().unwrap().clone();
        assert_eq!(served.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
        // One failure between 2 and 3: a fresh backoff (10 ms), not the
        // ceiling the first run of failures reached.
        let gap = served[2].1 - served[1].1;
        assert!(gap <= Duration::from_millis(20), "{gap:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_permits_a_shedding_listener_closes_and_a_waiting_one_does_not_accept() {
        let shed = Arc::new(Mutex::new(Vec::new()));
        let (listener, calls) = Scripted::new((1..=5).map(Ok).collect());
        let seen = shed.clone();
        let rules = Rules {
            name: "test",
            permits: Arc::new(Semaphore::new(2)),
            when_full: WhenFull::Shed(Box::new(move |_, p: &u32| seen.lock().unwrap().push(*p))),
        };
        // Each connection holds its permit for the whole test.
        let tasks = serve(
            listener,
            rules,
            tokio::time::sleep(Duration::from_secs(1)),
            |_, _, permit| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(permit);
            },
        )
        .await;
        assert_eq!(tasks.len(), 2);
        assert_eq!(*shed.lock().unwrap(), [3, 4, 5]);
        assert!(calls.load(Ordering::SeqCst) > 5);

        let (listener, calls) = Scripted::new((1..=5).map(Ok).collect());
        let rules = Rules {
            name: "test",
            permits: Arc::new(Semaphore::new(2)),
            when_full: WhenFull::Wait,
        };
        let tasks = serve(
            listener,
            rules,
            tokio::time::sleep(Duration::from_secs(1)),
            |_, _, permit| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(permit);
            },
        )
        .await;
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "no accept past the permits"
        );
    }
}
