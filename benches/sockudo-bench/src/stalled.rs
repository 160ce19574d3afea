//! Slow consumers: subscribers that never read after subscribing (a small `SO_RCVBUF`, set
//! before connecting, makes them back up fast), and what the server did about them.
//!
//! While a step runs, a watcher thread samples the server's resident memory and, for each
//! stalled socket, the state of the server's end of that TCP connection (netlink `sock_diag`):
//! a server that gives up on a client closes its end, which leaves ESTABLISHED at once even
//! though its FIN (and any close frame) waits behind the full window. That gives the time to
//! close without reading. After the step each stalled socket is drained: everything buffered
//! is read and decoded until the close frame (its code and reason), end of stream, or silence.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys;
use crate::wire::{self, Event, Masks, Reader};

/// A subscriber that stopped reading right after `subscription_succeeded`.
pub struct StalledSub {
    pub stream: std::net::TcpStream,
    pub leftover: Vec<u8>,
    pub reader: Reader,
    /// This end of the connection.
    pub local: SocketAddr,
    /// The server's end.
    pub peer: SocketAddr,
}

/// One TCP socket as `sock_diag` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (1 = ESTABLISHED, 4 = FIN_WAIT1, ...).
    pub state: u8,
}

/// TCP_ESTABLISHED and TCP_LISTEN in the kernel's numbering.
pub const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack listener shows IPv4 peers that way).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

const NLMSG_HDR: usize = 16;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct inet_diag_msg`: family, state, timer, retrans, then `inet_diag_sockid` (ports,
/// addresses, interface, cookie) and five u32 counters.
const DIAG_MSG_LEN: usize = 72;

/// A `SOCK_DIAG_BY_FAMILY` request for the one TCP socket whose own end is `local` and whose
/// peer is `remote`: the kernel answers from a hash lookup (a dump would walk the whole table).
fn diag_request(local: SocketAddr, remote: SocketAddr, seq: u32) -> Vec<u8> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let ip = |a: SocketAddr| -> [u8; 16] {
        let mut b = [0u8; 16];
        match a.ip() {
            IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b = v6.octets(),
        }
        b
    };
    let mut r = Vec::with_capacity(72);
    r.extend_from_slice(&72u32.to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    r.extend_from_slice(&seq.to_ne_bytes());
    r.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, extensions, pad, states (all), then the socket id.
    r.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    r.extend_from_slice(&u32::MAX.to_ne_bytes());
    r.extend_from_slice(&local.port().to_be_bytes());
    r.extend_from_slice(&remote.port().to_be_bytes());
    r.extend_from_slice(&ip(local));
    r.extend_from_slice(&ip(remote));
    r.extend_from_slice(&0u32.to_ne_bytes());
    // INET_DIAG_NOCOOKIE: match by addresses alone.
    r.extend_from_slice(&[0xFF; 8]);
    r
}

/// Parses netlink replies: the sockets listed; `Ok(None)` for "no such socket" (ENOENT).
fn parse_diag(buf: &[u8], out: &mut Vec<TcpEntry>) -> std::io::Result<Option<()>> {
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDR || at + len > buf.len() {
            return Err(std::io::Error::other("truncated netlink message"));
        }
        match kind {
            NLMSG_DONE => return Ok(Some(())),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or([0; 4]));
                return match -errno {
                    0 => Ok(Some(())),
                    libc::ENOENT => Ok(None),
                    e => Err(std::io::Error::from_raw_os_error(e)),
                };
            }
            SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + DIAG_MSG_LEN => {
                let m = &buf[at + NLMSG_HDR..at + len];
                let port = |i: usize| u16::from_be_bytes([m[i], m[i + 1]]);
                let ip = |i: usize| -> IpAddr {
                    if m[0] == libc::AF_INET as u8 {
                        IpAddr::V4(Ipv4Addr::new(m[i], m[i + 1], m[i + 2], m[i + 3]))
                    } else {
                        let b: [u8; 16] = m[i..i + 16].try_into().unwrap_or([0; 16]);
                        IpAddr::V6(Ipv6Addr::from(b))
                    }
                };
                // inet_diag_sockid at offset 4: sport, dport, src[16], dst[16], ...
                out.push(TcpEntry {
                    local: canonical(SocketAddr::new(ip(8), port(4))),
                    remote: canonical(SocketAddr::new(ip(24), port(6))),
                    state: m[1],
                });
            }
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Ok(Some(()))
}

/// A netlink `sock_diag` socket for looking up single TCP sockets of this network namespace.
pub struct Diag {
    fd: std::os::fd::OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket creation; the descriptor is owned at once.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0, buf: vec![0u8; 8192] })
    }

    /// The state of the socket whose own end is `local` and whose peer is `remote`; `None`
    /// when there is none (a listener that matched instead counts as none).
    pub fn state(&mut self, local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u8>> {
        use std::os::fd::AsRawFd;
        self.seq = self.seq.wrapping_add(1);
        let req = diag_request(local, remote, self.seq);
        let raw = self.fd.as_raw_fd();
        // SAFETY: sends a live buffer on our netlink socket (the kernel is the default peer).
        if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: receives into a live buffer of buf.len() bytes.
        let n = unsafe { libc::recv(raw, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut found = Vec::new();
        if parse_diag(&self.buf[..n as usize], &mut found)?.is_none() {
            return Ok(None);
        }
        let (local, remote) = (canonical(local), canonical(remote));
        Ok(found.iter().find(|e| e.local == local && e.remote == remote && e.state != LISTEN).map(|e| e.state))
    }
}

/// What the watcher saw during a step.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    pub rss_start_kb: Option<u64>,
    pub rss_max_kb: Option<u64>,
    /// Per stalled socket: whether the server's end was seen at all.
    pub visible: Vec<bool>,
    /// Per stalled socket: seconds from the watch's start until the server's end left ESTABLISHED.
    pub closed_after: Vec<Option<f64>>,
}

/// Samples the server's RSS and the server ends of stalled sockets (every 100 ms, while some
/// are still established) on a thread of its own.
pub struct Watch {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Watched>>,
    join: Option<JoinHandle<()>>,
}

impl Watch {
    /// `watched`: (server address, client address) of each stalled socket.
    pub fn start(server_pid: Option<u32>, watched: Vec<(SocketAddr, SocketAddr)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = server_pid.map(|p| p.to_string());
        let first = pid.as_deref().and_then(sys::rss_kb);
        let state = Arc::new(Mutex::new(Watched {
            rss_start_kb: first,
            rss_max_kb: first,
            visible: vec![false; watched.len()],
            closed_after: vec![None; watched.len()],
        }));
        let started = Instant::now();
        let join = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::Builder::new()
                .name("watch".into())
                .spawn(move || {
                    let mut diag = if watched.is_empty() { None } else { Diag::open().ok() };
                    // Once: which server ends can be seen at all (not when the server is remote).
                    if let Some(d) = &mut diag {
                        if let Ok(mut s) = state.lock() {
                            for (i, (srv, cli)) in watched.iter().enumerate() {
                                let st = d.state(*srv, *cli).ok().flatten();
                                s.visible[i] = st.is_some();
                                if st.is_some_and(|st| st != ESTABLISHED) {
                                    s.closed_after[i] = Some(0.0);
                                }
                            }
                        }
                    }
                    while !stop.load(Relaxed) {
                        let rss = pid.as_deref().and_then(sys::rss_kb);
                        let at = started.elapsed().as_secs_f64();
                        if let Ok(mut s) = state.lock() {
                            if let Some(r) = rss {
                                s.rss_max_kb = Some(s.rss_max_kb.unwrap_or(0).max(r));
                            }
                            for (i, (srv, cli)) in watched.iter().enumerate() {
                                if !s.visible[i] || s.closed_after[i].is_some() {
                                    continue;
                                }
                                // Past ESTABLISHED (FIN_WAIT1 behind the full window) or gone.
                                if let Some(Ok(st)) = diag.as_mut().map(|d| d.state(*srv, *cli)) {
                                    if st != Some(ESTABLISHED) {
                                        s.closed_after[i] = Some(at);
                                    }
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .ok()
        };
        Self { stop, state, join }
    }

    pub fn stop(mut self) -> Watched {
        self.stop.store(true, Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// What was read from a stalled socket after the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drained {
    pub bytes: u64,
    /// Text messages decoded (bench deliveries among them).
    pub messages: u64,
    pub bench: u64,
    /// The close frame: code (if any) and reason.
    pub close: Option<(Option<u16>, String)>,
    pub eof: bool,
    /// The stream ended inside a frame or a fragmented message.
    pub truncated: bool,
    pub error: Option<String>,
}

impl Drained {
    /// How the connection ended, as a short label.
    pub fn ending(&self) -> String {
        match (&self.close, &self.error) {
            (Some((Some(code), _)), _) => format!("close {code}"),
            (Some((None, _)), _) => "close (no code)".to_owned(),
            (None, Some(e)) => format!("{e}, no close frame"),
            (None, None) if self.eof && self.truncated => "EOF mid-frame, no close frame".to_owned(),
            (None, None) if self.eof => "EOF, no close frame".to_owned(),
            (None, None) => "still open".to_owned(),
        }
    }
}

/// Decodes a drained byte stream incrementally, up to the close frame.
pub struct DrainParser {
    reader: Reader,
    buf: Vec<u8>,
    pos: usize,
    pub out: Drained,
}

impl DrainParser {
    pub fn new(reader: Reader, leftover: Vec<u8>) -> Self {
        let mut p = Self { reader, buf: Vec::new(), pos: 0, out: Drained::default() };
        p.feed(&leftover);
        p
    }

    /// Adds bytes; returns true once the close frame has been seen (or the stream is invalid).
    pub fn feed(&mut self, data: &[u8]) -> bool {
        self.out.bytes += data.len() as u64;
        if self.done() {
            return true;
        }
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
        loop {
            match self.reader.next(&mut self.buf, &mut self.pos) {
                Ok(None) => break,
                Ok(Some(Event::Text(t))) => {
                    self.out.messages += 1;
                    if crate::locate::locate(t).and_then(|f| f.event).is_some_and(|e| e.raw == b"bench") {
                        self.out.bench += 1;
                    }
                }
                Ok(Some(Event::Close { code, reason })) => {
                    self.out.close = Some((code, String::from_utf8_lossy(reason).into_owned()));
                    break;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    self.out.error = Some(format!("protocol error: {e}"));
                    break;
                }
            }
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.done()
    }

    fn done(&self) -> bool {
        self.out.close.is_some() || self.out.error.is_some()
    }

    /// The summary, given whether the stream reached its end.
    pub fn finish(mut self, eof: bool) -> Drained {
        self.out.eof = eof;
        self.out.truncated = self.out.close.is_none() && (self.buf.len() > self.pos || self.reader.in_message());
        self.out
    }
}

/// Reads a stalled socket until its close frame, end of stream, `idle` without data, or `total`.
/// Answers a close frame with the same code; closes a socket the server left open with 1000.
pub async fn drain(sub: StalledSub, idle: Duration, total: Duration) -> Drained {
    let mut parser = DrainParser::new(sub.reader, sub.leftover);
    let stream = match tokio::net::TcpStream::from_std(sub.stream) {
        Ok(s) => s,
        Err(e) => {
            parser.out.error = Some(format!("error: {}", e.kind()));
            return parser.finish(false);
        }
    };
    let deadline = tokio::time::Instant::now() + total;
    let mut buf = vec![0u8; 256 * 1024];
    let mut eof = false;
    let mut closed = parser.feed(&[]);
    while !closed {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.readable()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                parser.out.error = Some(format!("error: {}", e.kind()));
                break;
            }
            Ok(Ok(())) => {}
        }
        match stream.try_read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => closed = parser.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                parser.out.error = Some(format!("error: {}", e.kind()));
                break;
            }
        }
    }
    let code = match &parser.out.close {
        Some((code, _)) => Some(code.unwrap_or(1000)),
        None if !eof && parser.out.error.is_none() => Some(1000),
        None => None,
    };
    if let Some(code) = code {
        let mut frame = Vec::new();
        wire::encode_close(code, Masks::new(sys::now_nanos()).mask(), &mut frame);
        let _ = stream.try_write(&frame);
    }
    parser.finish(eof)
}

/// The slow-consumer figures of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StalledReport {
    pub stalled: usize,
    /// `SO_RCVBUF` asked for on the stalled sockets (Linux doubles it).
    pub recv_buffer_bytes: u32,
    /// Stalled sockets the server ended (close frame, end of stream or reset).
    pub closed_by_server: usize,
    /// How each ended: "close 4100", "EOF, no close frame", "still open", ...
    pub endings: BTreeMap<String, u64>,
    /// The first close frame's reason text.
    pub close_reason: Option<String>,
    /// Stalled sockets whose server end showed up in `/proc/net/tcp` (0: server not on this host).
    pub server_side_visible: usize,
    /// Seconds from the first publish until the server closed its end, per closed socket, sorted.
    pub seconds_to_close: Vec<f64>,
    pub drained_bytes: u64,
    /// Bench deliveries found in the drained bytes (they are not in the latency figures).
    pub drained_bench_frames: u64,
}

impl StalledReport {
    pub fn new(stalled: usize, recv_buffer_bytes: u32, watched: &Watched, drained: &[Drained]) -> Self {
        let mut r = Self { stalled, recv_buffer_bytes, ..Self::default() };
        for d in drained {
            *r.endings.entry(d.ending()).or_default() += 1;
            if d.ending() != "still open" {
                r.closed_by_server += 1;
            }
            if r.close_reason.is_none() {
                r.close_reason = d.close.as_ref().map(|(_, reason)| reason.clone());
            }
            r.drained_bytes += d.bytes;
            r.drained_bench_frames += d.bench;
        }
        r.server_side_visible = watched.visible.iter().filter(|v| **v).count();
        r.seconds_to_close = watched.closed_after.iter().flatten().copied().collect();
        r.seconds_to_close.sort_by(f64::total_cmp);
        r
    }

    /// "min / median / max" seconds to close, or "n/a".
    pub fn close_times(&self) -> String {
        let s = &self.seconds_to_close;
        match (s.first(), s.get(s.len() / 2), s.last()) {
            (Some(a), Some(m), Some(b)) => format!("{a:.1} / {m:.1} / {b:.1} s ({} seen)", s.len()),
            _ if self.server_side_visible == 0 => "n/a (server end not visible here)".to_owned(),
            _ => "none closed".to_owned(),
        }
    }

    pub fn endings_text(&self) -> String {
        let e: Vec<String> = self.endings.iter().map(|(k, v)| format!("{v}x {k}")).collect();
        e.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::server_frame;
    use crate::wire::{OP_CLOSE, OP_CONTINUATION, OP_TEXT};

    fn bench(seq: usize) -> Vec<u8> {
        server_frame(true, OP_TEXT, format!(r#"{{"event":"bench","channel":"c","data":"1:{seq}:5"}}"#).as_bytes())
    }

    fn close(code: u16, reason: &str) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        server_frame(true, OP_CLOSE, &p)
    }

    #[test]
    fn finds_the_close_code_after_buffered_frames() {
        let mut bytes = bench(0);
        bytes.extend(bench(1));
        bytes.extend(close(4100, "Slow consumer"));
        bytes.extend(bench(2));
        // Fed in awkward pieces, starting with a leftover from the subscribe path.
        let mut p = DrainParser::new(Reader::default(), bytes[..3].to_vec());
        let mut done = false;
        for chunk in bytes[3..].chunks(7) {
            done = p.feed(chunk);
            if done {
                break;
            }
        }
        assert!(done);
        let d = p.finish(false);
        assert_eq!(d.close, Some((Some(4100), "Slow consumer".to_owned())));
        assert_eq!((d.messages, d.bench), (2, 2));
        assert_eq!(d.ending(), "close 4100");
        assert!(!d.truncated);
    }

    #[test]
    fn eof_without_close_frame() {
        let mut bytes = bench(0);
        bytes.extend(bench(1));
        let mut p = DrainParser::new(Reader::default(), Vec::new());
        assert!(!p.feed(&bytes[..bytes.len() - 4]));
        let d = p.finish(true);
        assert_eq!(d.bench, 1);
        assert!(d.truncated);
        assert_eq!(d.ending(), "EOF mid-frame, no close frame");

        let mut p = DrainParser::new(Reader::default(), Vec::new());
        p.feed(&bytes);
        assert_eq!(p.finish(true).ending(), "EOF, no close frame");
        let mut p = DrainParser::new(Reader::default(), Vec::new());
        p.feed(&server_frame(false, OP_TEXT, b"{\"ev"));
        p.feed(&server_frame(false, OP_CONTINUATION, b"ent\""));
        assert_eq!(p.finish(true).ending(), "EOF mid-frame, no close frame");
        assert_eq!(DrainParser::new(Reader::default(), Vec::new()).finish(false).ending(), "still open");
    }

    #[test]
    fn close_without_code() {
        let mut p = DrainParser::new(Reader::default(), server_frame(true, OP_CLOSE, b""));
        assert!(p.feed(&[]));
        assert_eq!(p.finish(true).ending(), "close (no code)");
    }

    #[test]
    fn summarises_stalled_sockets() {
        let watched = Watched {
            visible: vec![true, true, false],
            closed_after: vec![Some(7.5), Some(6.0), None],
            ..Watched::default()
        };
        let closed = Drained { close: Some((Some(4100), "slow".into())), bytes: 10, bench: 2, ..Drained::default() };
        let open = Drained::default();
        let r = StalledReport::new(3, 4096, &watched, &[closed.clone(), closed, open]);
        assert_eq!(r.closed_by_server, 2);
        assert_eq!(r.endings.get("close 4100"), Some(&2));
        assert_eq!(r.endings.get("still open"), Some(&1));
        assert_eq!(r.close_reason.as_deref(), Some("slow"));
        assert_eq!(r.seconds_to_close, vec![6.0, 7.5]);
        assert_eq!(r.server_side_visible, 2);
        assert_eq!((r.drained_bytes, r.drained_bench_frames), (20, 4));
        assert!(r.close_times().starts_with("6.0 / 7.5 / 7.5 s"));
    }

    #[test]
    fn parses_sock_diag_replies() {
        // One inet_diag_msg for 127.0.0.1:16001 -> 127.0.0.2:40001 in FIN_WAIT1.
        let mut msg = vec![0u8; NLMSG_HDR + DIAG_MSG_LEN];
        msg[..4].copy_from_slice(&((NLMSG_HDR + DIAG_MSG_LEN) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let m = &mut msg[NLMSG_HDR..];
        m[0] = libc::AF_INET as u8;
        m[1] = 4;
        m[4..6].copy_from_slice(&16001u16.to_be_bytes());
        m[6..8].copy_from_slice(&40001u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[24..28].copy_from_slice(&[127, 0, 0, 2]);
        let mut out = Vec::new();
        assert_eq!(parse_diag(&msg, &mut out).expect("valid"), Some(()));
        let want = TcpEntry {
            local: "127.0.0.1:16001".parse().expect("addr"),
            remote: "127.0.0.2:40001".parse().expect("addr"),
            state: 4,
        };
        assert_eq!(out, vec![want]);
        // "No such socket" and a truncated message.
        let mut err = vec![0u8; 36];
        err[..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_diag(&err, &mut Vec::new()).expect("valid"), None);
        assert!(parse_diag(&msg[..30], &mut Vec::new()).is_err());
        // The request names the socket: ports big-endian after the header and family bytes.
        let req = diag_request(want.local, want.remote, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(&req[24..28], &[0x3E, 0x81, 0x9C, 0x41]);
        assert_eq!(&req[28..32], &[127, 0, 0, 1]);
        assert_eq!(&req[44..48], &[127, 0, 0, 2]);
    }

    #[test]
    fn sees_its_own_sockets_close() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let (srv, cli) = (s.local_addr().expect("addr"), c.local_addr().expect("addr"));
        let mut d = Diag::open().expect("sock_diag");
        assert_eq!(d.state(srv, cli).expect("lookup"), Some(ESTABLISHED));
        // The "server" closes its end: it leaves ESTABLISHED (FIN_WAIT1/2) at once.
        drop(s);
        let after = d.state(srv, cli).expect("lookup");
        assert!(after != Some(ESTABLISHED), "{after:?}");
        // No such connection at all.
        let other: SocketAddr = "127.0.0.9:9".parse().expect("addr");
        assert_eq!(d.state(other, cli).expect("lookup"), None);
    }
}
