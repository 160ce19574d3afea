//! Opens a fan-out subscriber by hand on a tokio socket: TCP connect (from a chosen source
//! address, with an optional small receive buffer), the HTTP upgrade, `pusher:connection_established`,
//! a masked `pusher:subscribe` frame and `pusher_internal:subscription_succeeded`. It then hands
//! back the plain nonblocking socket together with every byte read past the subscription reply,
//! so the receiver that takes the socket over starts exactly where this left off (a WebSocket
//! library would keep such bytes in a buffer it does not give back).
//!
//! On a `wss://` target the TLS handshake (tokio-rustls) comes between the TCP connect and the
//! upgrade; the rustls session is handed over with the socket (and whatever it has decrypted
//! but not yet given out), and the receiver goes on decrypting with it. The plain path is the
//! same code on the bare socket.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rustls::ClientConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::locate;
use crate::pusher::{self, fail, Failure, Stage, Target};
use crate::wire::{self, Event, Masks, Reader};

/// A subscribed connection, ready to be read without a WebSocket library.
pub struct Subscribed {
    /// Nonblocking.
    pub stream: std::net::TcpStream,
    /// Bytes already read that follow the subscription reply (whole or partial frames).
    pub leftover: Vec<u8>,
    pub reader: Reader,
    pub local: SocketAddr,
    /// The TLS session on a `wss://` target (it may hold decrypted bytes not yet read).
    pub tls: Option<Box<ClientConnection>>,
}

/// How to open a subscriber.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub source: Option<IpAddr>,
    /// `SO_RCVBUF` set before connecting (small for subscribers meant to stall).
    pub recv_buffer: Option<u32>,
    /// `TCP_MAXSEG` set before connecting: the MSS announced to the server, which sizes the
    /// server's send buffer from it (see [`STALLED_MSS`]).
    pub max_segment: Option<u32>,
}

/// The MSS stalled subscribers announce: a typical Ethernet path's. Over loopback the MSS is
/// about 64 KiB, and Linux sizes a socket's send buffer from it (2 x 10 segments of 128 KiB
/// true size, x3 under BBR, capped by `tcp_wmem`): 4 MB per socket that would absorb a stalled
/// client's backlog before the server's own queue ever saw it. With 1400 the server's kernel
/// holds about 120 KB, as it would for a client across a network.
pub const STALLED_MSS: u32 = 1400;

fn set_max_segment(socket: &TcpSocket, mss: u32) -> std::io::Result<()> {
    let v = libc::c_int::try_from(mss).unwrap_or(libc::c_int::MAX);
    // SAFETY: sets an int option on an open socket from a live value.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket of a connection being opened: bare, or under TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection in the middle of being opened.
struct Conn {
    stream: Io,
    buf: Vec<u8>,
    pos: usize,
    reader: Reader,
    masks: Masks,
    timeout: Duration,
}

impl Conn {
    async fn write_all(&mut self, mut bytes: &[u8], stage: Stage) -> Result<(), Failure> {
        let stream = match &mut self.stream {
            Io::Plain(s) => s,
            Io::Tls(s) => {
                let write = async {
                    s.write_all(bytes).await?;
                    s.flush().await
                };
                return tokio::time::timeout(self.timeout, write)
                    .await
                    .map_err(|_| fail(stage, "write timed out"))?
                    .map_err(|e| fail(stage, e));
            }
        };
        while !bytes.is_empty() {
            tokio::time::timeout(self.timeout, stream.writable())
                .await
                .map_err(|_| fail(stage, "write timed out"))?
                .map_err(|e| fail(stage, e))?;
            match stream.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(stage, e)),
            }
        }
        Ok(())
    }

    /// Reads more bytes into `buf` (dropping what was consumed first).
    async fn fill(&mut self, stage: Stage) -> Result<(), Failure> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let stream = match &mut self.stream {
            Io::Plain(s) => s,
            Io::Tls(s) => {
                let len = self.buf.len();
                self.buf.resize(len + 16 * 1024, 0);
                let read = s.read(&mut self.buf[len..]).await;
                let n = read.as_ref().map_or(0, |n| *n);
                self.buf.truncate(len + n);
                return match read {
                    Ok(0) => Err(fail(stage, "connection closed")),
                    Ok(_) => Ok(()),
                    Err(e) => Err(fail(stage, e)),
                };
            }
        };
        loop {
            stream.readable().await.map_err(|e| fail(stage, e))?;
            let len = self.buf.len();
            self.buf.resize(len + 16 * 1024, 0);
            match stream.try_read(&mut self.buf[len..]) {
                Ok(0) => {
                    self.buf.truncate(len);
                    return Err(fail(stage, "connection closed"));
                }
                Ok(n) => {
                    self.buf.truncate(len + n);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.buf.truncate(len),
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(fail(stage, e));
                }
            }
        }
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8], stage: Stage) -> Result<(), Failure> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        wire::encode_client(opcode, payload, self.masks.mask(), &mut out);
        self.write_all(&out, stage).await
    }

    /// Reads until the named event arrives (on `channel`, if given), answering pings and
    /// failing on `pusher:error`, `pusher:subscription_error` or close.
    async fn wait_event(&mut self, event: &str, channel: Option<&str>, stage: Stage) -> Result<(), Failure> {
        let timeout = self.timeout;
        let wait = async {
            loop {
                // Replies are collected first: the decoded event borrows the buffer.
                let mut reply: Option<(u8, Vec<u8>)> = None;
                let mut done = false;
                let mut scratch = Vec::new();
                match self.reader.next(&mut self.buf, &mut self.pos).map_err(|e| fail(stage, e))? {
                    None => {
                        self.fill(stage).await?;
                        continue;
                    }
                    Some(Event::Text(text)) => {
                        let Some(f) = locate::locate(text) else {
                            continue;
                        };
                        let name = f.event.and_then(|e| e.bytes(&mut scratch).map(<[u8]>::to_vec)).unwrap_or_default();
                        let on_channel = match (channel, f.channel) {
                            (None, _) => true,
                            (Some(want), Some(got)) => got.eq_str(want, &mut scratch),
                            (Some(_), None) => false,
                        };
                        if name == event.as_bytes() && on_channel {
                            done = true;
                        } else if name == b"pusher:ping" {
                            reply = Some((wire::OP_TEXT, crate::pusher::PONG.as_bytes().to_vec()));
                        } else if name == b"pusher:error" || (name == b"pusher:subscription_error" && on_channel) {
                            return Err(fail(stage, String::from_utf8_lossy(text)));
                        }
                    }
                    Some(Event::Ping(p)) => reply = Some((wire::OP_PONG, p.to_vec())),
                    Some(Event::Close { code, reason }) => {
                        return Err(fail(
                            stage,
                            format!("closed by server: {code:?} {}", String::from_utf8_lossy(reason)),
                        ));
                    }
                    Some(Event::Pong | Event::Binary) => {}
                }
                if done {
                    return Ok(());
                }
                if let Some((op, payload)) = reply {
                    self.send_frame(op, &payload, stage).await?;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| fail(stage, format!("no {event} in time")))?
    }
}

/// When each step of opening a connection ended, counted from just before the TCP connect.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub tcp: Duration,
    /// `None` on a plain target.
    pub tls: Option<Duration>,
    /// `pusher:connection_established` read.
    pub welcome: Duration,
}

/// A connection that has had its `pusher:connection_established` (and nothing more).
pub struct Welcomed {
    conn: Conn,
    local: SocketAddr,
    pub timings: Timings,
    /// What the TLS handshake agreed on (see [`crate::tls::describe`]).
    pub tls_session: Option<String>,
}

/// Connects (then the TLS handshake on a `wss://` target), upgrades and waits for the welcome.
/// Every step is bounded by `target.timeout`.
pub async fn open_welcomed(target: &Target, opts: OpenOptions) -> Result<Welcomed, Failure> {
    let t0 = Instant::now();
    let socket = pusher::tcp_socket(target)?;
    if let Some(size) = opts.recv_buffer {
        socket.set_recv_buffer_size(size).map_err(|e| fail(Stage::Tcp, format!("SO_RCVBUF: {e}")))?;
    }
    if let Some(mss) = opts.max_segment {
        set_max_segment(&socket, mss).map_err(|e| fail(Stage::Tcp, format!("TCP_MAXSEG: {e}")))?;
    }
    let stream = pusher::connect_tcp(target, socket, opts.source).await?;
    let local = stream.local_addr().map_err(|e| fail(Stage::Tcp, e))?;
    let tcp = t0.elapsed();
    let (stream, tls, tls_session) = match &target.tls {
        None => (Io::Plain(stream), None, None),
        Some(tls) => {
            let s = tokio::time::timeout(target.timeout, tls.connector().connect(tls.name.clone(), stream))
                .await
                .map_err(|_| fail(Stage::Tls, "timed out"))?
                .map_err(|e| fail(Stage::Tls, e))?;
            let session = crate::tls::describe(s.get_ref().1);
            (Io::Tls(Box::new(s)), Some(t0.elapsed()), Some(session))
        }
    };
    let mut masks = Masks::new(crate::sys::now_nanos() ^ (u64::from(local.port()) << 48));
    let nonce: Vec<u8> = (0..2).flat_map(|_| masks.next_u64().to_le_bytes()).collect();
    let key = wire::base64(&nonce);
    let mut c = Conn { stream, buf: Vec::new(), pos: 0, reader: Reader::default(), masks, timeout: target.timeout };

    let request = wire::handshake_request(&target.authority(), &target.ws_path(), &key);
    c.write_all(request.as_bytes(), Stage::Handshake).await?;
    let head = tokio::time::timeout(target.timeout, async {
        loop {
            if let Some(n) = wire::parse_handshake_response(&c.buf, &key).map_err(|e| fail(Stage::Handshake, e))? {
                return Ok::<usize, Failure>(n);
            }
            // `fill` keeps everything (pos stays 0 until the head is parsed).
            c.fill(Stage::Handshake).await?;
        }
    })
    .await
    .map_err(|_| fail(Stage::Handshake, "timed out"))??;
    c.pos = head;

    c.wait_event("pusher:connection_established", None, Stage::Welcome).await?;
    let timings = Timings { tcp, tls, welcome: t0.elapsed() };
    Ok(Welcomed { conn: c, local, timings, tls_session })
}

/// Connects, upgrades, waits for the welcome, subscribes to `channel` and waits for the
/// subscription reply. Every step is bounded by `target.timeout`.
pub async fn open_subscribed(target: &Target, channel: &str, opts: OpenOptions) -> Result<Subscribed, Failure> {
    let Welcomed { conn: mut c, local, .. } = open_welcomed(target, opts).await?;
    let subscribe = crate::pusher::subscribe_json(channel);
    c.send_frame(wire::OP_TEXT, subscribe.as_bytes(), Stage::Subscribe).await?;
    c.wait_event("pusher_internal:subscription_succeeded", Some(channel), Stage::Subscribe).await?;

    let leftover = c.buf.split_off(c.pos);
    let (stream, tls) = match c.stream {
        Io::Plain(s) => (s, None),
        Io::Tls(s) => {
            let (s, session) = s.into_inner();
            (s, Some(Box::new(session)))
        }
    };
    let stream = stream.into_std().map_err(|e| fail(Stage::Subscribe, e))?;
    Ok(Subscribed { stream, leftover, reader: c.reader, local, tls })
}
