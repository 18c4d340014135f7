//! Runs llm-edge in-process: build the server from YAML, run it on its own thread, and shut it
//! down (fast) when the guard is dropped.

use async_trait::async_trait;
use llm_edge::server::{EdgeServer, RunOptions};
use llm_edge::trace::Tracer;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a proxy may take to accept connections after start.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A port that was free a moment ago, for a listener the test starts later. Also serves as a
/// "down replica": nothing listens there.
///
/// Ports come from below the kernel's ephemeral range (32768 and up by default), where
/// `bind(0)` (mock upstreams, client sockets) never lands, and each is handed out once per
/// process: a port probed with `bind(0)` and released could go to a test running in parallel
/// before this one's proxy bound it (seen in CI: a TLS client reached another test's plain
/// listener).
pub fn free_port() -> u16 {
    const BASE: usize = 20_000;
    const SPAN: usize = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Test binaries of one `cargo test` run one after another; a per-process start keeps
    // consecutive ones off the ports the previous one just closed.
    let start = (std::process::id() as usize).wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(
            n < SPAN,
            "no free test port left in {BASE}..{}",
            BASE + SPAN
        );
        let port = (BASE + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A per-test path under the system temp dir, unique within this process and across processes.
pub fn temp_path(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("llm-edge-test-{}-{n}-{name}", std::process::id()))
}

/// A fresh directory under the system temp dir (see [`temp_path`]), removed with everything in
/// it when dropped. Declare it before the [`Proxy`] writing into it, so the proxy stops first.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory.
    pub fn new(name: &str) -> Self {
        let path = temp_path(name);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Turns on the proxy's logs for debugging when `LLM_EDGE_TEST_LOG` is set (e.g. `debug`).
fn init_logging() {
    if let Ok(filter) = std::env::var("LLM_EDGE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Pingora's shutdown signal, fed by the guard.
pub struct StopWatch(pub watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for StopWatch {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        // A dropped sender also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// The shutdown signal of a [`Proxy`]: fast, unless the test began a graceful one.
struct ProxyStop {
    rx: watch::Receiver<bool>,
    graceful: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for ProxyStop {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        if self.graceful.load(Ordering::SeqCst) {
            ShutdownSignal::GracefulTerminate
        } else {
            ShutdownSignal::FastShutdown
        }
    }
}

/// Whether `yaml` sets the top-level key `key`.
pub fn has_key(yaml: &str, key: &str) -> bool {
    yaml.lines().any(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    })
}

/// The port of `admin: {listen: "127.0.0.1:PORT"}` in a config text, when the test set one.
fn admin_listen_port(text: &str) -> Option<u16> {
    let at = text.find("\nadmin:")?;
    let rest = &text[at..];
    let l = rest.find("127.0.0.1:")? + "127.0.0.1:".len();
    rest[l..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// A running llm-edge; fast-shuts down and joins its thread when dropped.
pub struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: watch::Sender<bool>,
    graceful: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    files: Vec<PathBuf>,
}

impl Proxy {
    /// Starts llm-edge with `yaml` (upstreams, models, routes, limits...). The harness adds
    /// `listen` on a free port and a `server` section (2 threads, no grace period, per-test
    /// pid file and upgrade socket), so `yaml` must not contain those two keys, and a
    /// `shutdown: {grace_period: 0s}` unless `yaml` has a `shutdown` section.
    pub fn start(yaml: &str) -> Self {
        Self::start_with_env(yaml, &[])
    }

    /// Like [`Proxy::start`], resolving `os.environ/NAME` and `${NAME}` from `env` only.
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(yaml, env, None)
    }

    /// Like [`Proxy::start`], with `tracer` in place of the one the config's `tracing:` section
    /// would build (tests use sinks they control, e.g. one that blocks).
    pub fn start_with_tracer(yaml: &str, tracer: Arc<Tracer>) -> Self {
        Self::launch(yaml, &[], Some(tracer))
    }

    fn launch(yaml: &str, env: &[(&str, &str)], tracer: Option<Arc<Tracer>>) -> Self {
        init_logging();
        let port = free_port();
        let mut admin_port = free_port();
        while admin_port == port {
            admin_port = free_port();
        }
        let pid_file = temp_path("pid");
        let upgrade_sock = temp_path("upgrade.sock");
        let text = format!(
            "listen: [\"127.0.0.1:{port}\"]\nserver: {{threads: 2, pid_file: {:?}, upgrade_sock: {:?}}}\n{}{}{}{yaml}",
            pid_file.display().to_string(),
            upgrade_sock.display().to_string(),
            if has_key(yaml, "shutdown") { "" } else { "shutdown: {grace_period: 0s}\n" },
            if has_key(yaml, "auth") { String::new() } else { "auth: {mode: open}\n".to_string() },
            if has_key(yaml, "admin") { String::new() } else { format!("admin: {{listen: \"127.0.0.1:{admin_port}\"}}\n") },
        );
        let admin_port = admin_listen_port(&text).unwrap_or(admin_port);
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cfg = llm_edge::config::from_yaml_str(&text, &|name| env.get(name).cloned())
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        let (stop, rx) = watch::channel(false);
        let graceful = Arc::new(AtomicBool::new(false));
        let signal = ProxyStop {
            rx,
            graceful: graceful.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("llm-edge-{port}"))
            .spawn(move || {
                let server = match tracer {
                    Some(t) => EdgeServer::with_tracer(cfg, RunOptions::default(), t),
                    None => EdgeServer::build(cfg, RunOptions::default()),
                };
                server.run(RunArgs {
                    shutdown_signal: Box::new(signal),
                });
            })
            .expect("spawn the proxy thread");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = Self {
            addr,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            stop,
            graceful,
            thread: Some(thread),
            files: vec![pid_file, upgrade_sock],
        };
        proxy.wait_accepting();
        proxy
    }

    fn wait_accepting(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let up =
                |a: &SocketAddr| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok();
            if up(&self.addr) && up(&self.admin) {
                return;
            }
            let finished = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(!finished, "the proxy thread exited during start-up");
            assert!(
                Instant::now() < deadline,
                "llm-edge did not accept connections on {} within {START_TIMEOUT:?}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a graceful shutdown (what SIGTERM does) and returns at once; dropping the proxy
    /// then waits for it to end.
    pub fn begin_graceful_shutdown(&self) {
        self.graceful.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://127.0.0.1:<admin port><path>` (`/metrics`, `/health/*`, `/admin/*`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            // A panic in the proxy thread was already printed; do not panic again in drop.
            let _ = t.join();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
