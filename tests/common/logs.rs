//! Log capture for tests that grep the proxy's log output (e.g. for secrets).

use std::sync::{Arc, Mutex, OnceLock};

/// Captured log output of every proxy in this test binary (debug level, all crates, including
/// Pingora's `log` records). Installed once, before the first proxy starts.
pub fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let echo = std::env::var("LLM_EDGE_TEST_LOG").is_ok();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug,llm_edge=trace"))
            .with_ansi(false)
            .with_writer(move || LogWriter {
                buf: sink.clone(),
                echo,
            })
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl std::io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.lock().unwrap().extend_from_slice(data);
        if self.echo {
            eprint!("{}", String::from_utf8_lossy(data));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
