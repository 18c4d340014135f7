//! A tiny authoritative DNS server on loopback ([`TestDns`]) for tests that need hostnames to
//! resolve to chosen addresses, and to change them while the proxy runs (re-resolution, DNS
//! rebinding). Wire format is hickory-proto's; the server only answers A and AAAA from a table.
//!
//! It runs on plain std threads, so it works whatever runtime (if any) the test uses. UDP and
//! TCP share one port, because resolvers retry over TCP when a UDP answer comes back truncated.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the serving threads look at the stop flag; bounds how long `Drop` waits.
const POLL: Duration = Duration::from_millis(20);

/// Largest UDP answer a client accepts without EDNS (RFC 1035); larger ones go truncated.
const PLAIN_UDP_LIMIT: usize = 512;

/// A loopback DNS server answering from a table that the test edits. Stops on drop.
pub struct TestDns {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    /// Lowercase name without the trailing dot → its addresses.
    records: Mutex<HashMap<String, Vec<IpAddr>>>,
    /// Lowercase name without the trailing dot → queries seen, any type, UDP and TCP.
    seen: Mutex<HashMap<String, usize>>,
    ttl: AtomicU32,
    stop: AtomicBool,
}

/// Table key: DNS names are case-insensitive and `a.test` is the same name as `a.test.`.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    /// Starts a server on `127.0.0.1` (UDP and TCP, same port) with an empty table and a 1 s TTL.
    pub fn start() -> TestDns {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("DNS UDP local address");
        udp.set_read_timeout(Some(POLL))
            .expect("DNS UDP read timeout");
        tcp.set_nonblocking(true).expect("DNS TCP non-blocking");
        let shared = Arc::new(Shared {
            records: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            ttl: AtomicU32::new(1),
            stop: AtomicBool::new(false),
        });
        let threads = vec![
            spawn("test-dns-udp", {
                let shared = shared.clone();
                move || serve_udp(&udp, &shared)
            }),
            spawn("test-dns-tcp", {
                let shared = shared.clone();
                move || serve_tcp(&tcp, &shared)
            }),
        ];
        TestDns {
            addr,
            shared,
            threads,
        }
    }

    /// Where it listens (UDP and TCP), e.g. for `dns: {nameservers: ["127.0.0.1:PORT"]}`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `name` answer with `ips` (A for IPv4, AAAA for IPv6), replacing earlier answers.
    /// An empty list keeps the name known: every query gets NOERROR with no answers.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        lock(&self.shared.records).insert(key(name), ips.to_vec());
    }

    /// Forgets `name`: queries for it get NXDOMAIN again.
    pub fn remove(&self, name: &str) {
        lock(&self.shared.records).remove(&key(name));
    }

    /// How many queries (any type, UDP or TCP) have asked for `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        lock(&self.shared.seen)
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }

    /// TTL of later answers, also the negative-caching TTL (SOA minimum). Defaults to 1 s.
    pub fn set_ttl(&self, secs: u32) {
        self.shared.ttl.store(secs, Ordering::Relaxed);
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A test that panicked while holding the table must not wedge the server for the others.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn DNS server thread")
}

/// UDP on an ephemeral port plus TCP on the same port; retried because that TCP port may be
/// taken by someone else.
fn bind_pair() -> (UdpSocket, TcpListener) {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for _ in 0..50 {
        let udp = UdpSocket::bind((lo, 0)).expect("bind DNS UDP socket on 127.0.0.1");
        let port = udp.local_addr().expect("DNS UDP local address").port();
        if let Ok(tcp) = TcpListener::bind((lo, port)) {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

fn serve_udp(sock: &UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        // Timeouts are the stop-flag poll; other errors (e.g. an ICMP unreachable left over
        // from a client that went away) must not end the server either.
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = shared.reply(&buf[..n], true) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

fn serve_tcp(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut conns = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                conns.push(spawn("test-dns-tcp-conn", move || {
                    serve_tcp_conn(stream, &shared)
                }));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

/// RFC 1035 §4.2.2 framing: each message is preceded by its 2-byte big-endian length.
fn serve_tcp_conn(mut stream: TcpStream, shared: &Shared) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            let Some(reply) = shared.reply(&msg, false) else {
                return;
            };
            let Ok(reply_len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = reply_len.to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

impl Shared {
    /// The encoded answer to one encoded query, or `None` to stay silent (unparseable input).
    fn reply(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        if req.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_authoritative(true)
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(false)
            .add_queries(req.queries().iter().cloned());
        let udp_limit = match req.extensions() {
            Some(edns) => {
                let mut ours = Edns::new();
                ours.set_max_payload(1232);
                resp.set_edns(ours);
                usize::from(edns.max_payload()).max(PLAIN_UDP_LIMIT)
            }
            None => PLAIN_UDP_LIMIT,
        };
        match (req.op_code(), req.queries()) {
            (OpCode::Query, [q]) => self.answer(&mut resp, q.name(), q.query_type()),
            (OpCode::Query, _) => {
                resp.set_response_code(ResponseCode::FormErr);
            }
            _ => {
                resp.set_response_code(ResponseCode::NotImp);
            }
        }
        let bytes = resp.to_vec().ok()?;
        if udp && bytes.len() > udp_limit {
            // Tells the client to ask again over TCP.
            return resp.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    /// Fills in the answer for `name`/`qtype` from the table and counts the query.
    fn answer(&self, resp: &mut Message, name: &Name, qtype: RecordType) {
        let k = key(&name.to_ascii());
        *lock(&self.seen).entry(k.clone()).or_insert(0) += 1;
        let ttl = self.ttl.load(Ordering::Relaxed);
        let ips = lock(&self.records).get(&k).cloned();
        let Some(ips) = ips else {
            resp.set_response_code(ResponseCode::NXDomain);
            resp.add_name_server(soa(name, ttl));
            return;
        };
        // The owner name is echoed as asked: resolvers using 0x20 case randomisation check it.
        let records: Vec<Record> = ips
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A::from(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA::from(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(name.clone(), ttl, rdata))
            .collect();
        if records.is_empty() {
            // NOERROR/NODATA: the name exists, just not with this type.
            resp.add_name_server(soa(name, ttl));
        }
        for r in records {
            resp.add_answer(r);
        }
    }
}

/// An SOA in the authority section of negative answers: resolvers take the negative-caching TTL
/// from it, so `set_ttl` bounds how long an NXDOMAIN is remembered too.
fn soa(name: &Name, ttl: u32) -> Record {
    let zone = name.trim_to(1);
    let rdata = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, ttl);
    Record::from_rdata(zone, ttl, RData::SOA(rdata))
}
