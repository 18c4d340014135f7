//! `bench-pingora`: the Pingora floor of the end-to-end benchmark (target `pingora-min`).
//!
//! A `ProxyHttp` with no logic: every request goes to one fixed upstream, no header or body
//! work, Pingora's defaults otherwise. It runs on the same Pingora version and features, the
//! same server settings (one thread, no work stealing), the same allocator (jemalloc) and the
//! same release profile as llm-edge, so what it costs is what the framework itself costs, and
//! llm-edge's figures split into that floor and llm-edge's own cost on top of it.
//!
//! Usage: `bench-pingora --listen 127.0.0.1:PORT --upstream HOST:PORT --tmp DIR`
//! (`DIR` holds the pid file and the upgrade socket). SIGINT stops it at once.

use async_trait::async_trait;
use llm_edge_e2e_tools::Flags;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Floor {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let (listen, upstream, tmp) = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench-pingora: {e}");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        // Like llm-edge with `server: {threads: 1}`, which turns work stealing off.
        threads: 1,
        work_stealing: false,
        // Pingora's defaults are fixed paths under /tmp, shared by every Pingora process on
        // the machine (llm-edge's processes in the benchmark have their own).
        pid_file: tmp.join("bench-pingora.pid").display().to_string(),
        upgrade_sock: tmp.join("bench-pingora-upgrade.sock").display().to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Floor {
            // Built once, so picking the peer costs a clone: the least any proxy can do.
            peer: HttpPeer::new(upstream, false, String::new()),
        },
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    eprintln!("bench-pingora: listening on {listen}, upstream {upstream}");
    server.run_forever()
}

fn settings() -> Result<(SocketAddr, SocketAddr, PathBuf), String> {
    let flags = Flags::from_env(&[])?;
    let listen = flags.required("listen")?;
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("--listen {listen:?}: {e}"))?;
    let upstream = flags.required("upstream")?;
    // HttpPeer::new panics on an address it cannot resolve; fail with a message instead.
    let upstream = upstream
        .to_socket_addrs()
        .map_err(|e| format!("--upstream {upstream:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--upstream {upstream:?}: no address"))?;
    let tmp = Path::new(flags.required("tmp")?);
    if !tmp.is_dir() {
        return Err(format!("--tmp {}: not a directory", tmp.display()));
    }
    Ok((listen, upstream, tmp.to_path_buf()))
}
