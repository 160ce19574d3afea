//! The fan-out receive path: a few threads (half the cores by default), each running
//! edge-triggered `epoll` over its share of the subscribed sockets. A readable socket is
//! `read()` once into the thread's buffer (after any partial frame the socket left last time),
//! the receive time is taken right after the read, and the server frames in it are decoded in
//! place ([`wire`]): a `bench` event's `data` is found without a JSON tree ([`locate`]) and
//! recorded in the thread's latency histogram and its `[seq][subscriber]` counts; pings
//! (WebSocket and `pusher:ping`) are answered with masked frames; a close is answered and
//! counted. The controller talks to a thread through a channel and an eventfd that wakes its
//! `epoll_wait`; at the end of a step every thread accounts its subscribers against the
//! acknowledged publishes and hands back its histogram and counts, which the controller merges.
//!
//! A delivery costs one `recv()` (plus a share of an `epoll_wait`) instead of a task wake-up,
//! a WebSocket library's copies and a JSON parse: the tool's CPU per delivery is what sets how
//! much of a small machine the measurement itself takes. Before each read the socket is put in
//! delayed-ACK mode, which takes the ACK (and, over loopback, the server socket's processing of
//! it) out of that `recv()`.
//!
//! Over TLS a connection carries its rustls session: the same single `read()` (and the same
//! receive time) brings in ciphertext, which the session decrypts into the thread's buffer
//! before the same decoder runs; replies are encrypted by the session and written from it.
//! Sockets without a session take the plain path unchanged.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConnection;
use tokio::sync::oneshot;

use crate::locate::{self, Fields};
use crate::report;
use crate::sys::now_nanos;
use crate::wire::{self, Event, Masks, Reader};

/// Largest sequence number a subscriber tracks (guards against garbage payloads).
pub const MAX_SEQ: usize = 50_000_000;

/// Bytes asked of one `read()`.
const CHUNK: usize = 256 * 1024;

/// The epoll token of a thread's eventfd (sockets use their index).
const WAKE: u64 = u64::MAX;

/// How long closing waits for the server to answer the close frames.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Counters shared by the receiver threads and the progress line.
#[derive(Default)]
pub struct Counters {
    pub delivered: AtomicU64,
    /// Deliveries of a step that was already accounted.
    pub late: AtomicU64,
    /// Frames that could not be decoded, bench events on the wrong channel or with a bad payload.
    pub stray: AtomicU64,
    /// Subscribers whose connection ended (before the tool closed it).
    pub disconnects: AtomicU64,
    /// How the server ended those connections: "close 4100", "EOF", "error: ...".
    pub endings: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn ended(&self, how: String) {
        self.disconnects.fetch_add(1, Relaxed);
        if let Ok(mut m) = self.endings.lock() {
            *m.entry(how).or_default() += 1;
        }
    }
}

/// A subscribed socket handed to a receiver.
pub struct NewSub {
    /// Nonblocking.
    pub stream: TcpStream,
    /// Bytes read past the subscription reply.
    pub leftover: Vec<u8>,
    /// The decoder state at hand-off (a fragmented message may be in progress).
    pub reader: Reader,
    pub channel_index: usize,
    pub channel: Arc<str>,
    /// The TLS session (`wss://`): it may already hold decrypted bytes past `leftover`.
    pub tls: Option<Box<ClientConnection>>,
}

/// One receiver thread's account of a step.
pub struct ThreadReport {
    pub hist: Histogram<u64>,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    /// Per channel, per sequence number: (deliveries, latest delivery's latency in µs).
    pub per_publish: Vec<Vec<(u32, u32)>>,
    /// `read()` calls and `epoll_wait` returns since the last report.
    pub reads: u64,
    pub wakeups: u64,
}

enum Cmd {
    Add(Box<NewSub>),
    /// Account `step` against the acknowledged publishes (per channel, per sequence).
    Report {
        step: u32,
        acked: Arc<Vec<Vec<bool>>>,
        reply: oneshot::Sender<ThreadReport>,
    },
    /// A step starts: zero the read and wake-up counters.
    Mark,
    Close,
}

struct Handle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    join: Option<JoinHandle<()>>,
    /// The thread's CPU-time clock.
    clock: Option<libc::clockid_t>,
    subs: usize,
}

impl Handle {
    fn send(&self, cmd: Cmd) -> bool {
        if self.tx.send(cmd).is_err() {
            return false;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        true
    }
}

/// The receiver threads.
pub struct Receivers {
    threads: Vec<Handle>,
    pub counters: Arc<Counters>,
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: epfd and fd are open descriptors; ev lives across the call.
    cvt(unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) }).map(|_| ())
}

/// Edge-triggered: a socket is reported once per arrival instead of being polled again on
/// every `epoll_wait` until a read finds it empty. A read that returns less than it asked for
/// has emptied the receive queue (`tcp_recvmsg` stops only when the queue is exhausted), so
/// one read per event suffices; a full read is followed by another.
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Puts the socket in delayed-ACK ("pingpong") mode for the next read. A read that empties the
/// receive queue after a small segment otherwise sends an ACK at once — over loopback that
/// runs the whole ACK path, the server socket's side included, inside our `recv()`, about half
/// of the tool's CPU per delivery. Deferred, the ACK goes out from the delayed-ACK timer
/// (cumulative when frames come faster than its 40 ms), after the broadcast instead of during
/// it. The kernel leaves this mode whenever that timer fires, hence a call before each read.
fn delay_ack(fd: RawFd) {
    let off: libc::c_int = 0;
    // SAFETY: sets an int option on an open socket from a live value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

impl Receivers {
    /// Starts `n` threads for subscribers spread over `channels` channels.
    pub fn start(n: usize, channels: usize, delayed_acks: bool) -> Result<Self, String> {
        let counters = Arc::new(Counters::default());
        let mut threads = Vec::with_capacity(n.max(1));
        for k in 0..n.max(1) {
            // SAFETY: plain syscalls creating descriptors that are wrapped in OwnedFd at once.
            let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map_err(|e| format!("epoll: {e}"))?;
            let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
            let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
                .map_err(|e| format!("eventfd: {e}"))?;
            let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
            epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, wake.as_raw_fd(), libc::EPOLLIN as u32, WAKE)
                .map_err(|e| format!("epoll_ctl: {e}"))?;
            let (tx, rx) = mpsc::channel();
            let worker = Worker {
                epfd,
                wake: wake.clone(),
                rx,
                conns: Vec::new(),
                open: 0,
                rbuf: vec![0; CHUNK],
                tbuf: Vec::new(),
                book: Book { steps: Vec::new(), accounted_upto: 0, channels },
                counters: counters.clone(),
                scratch: Vec::new(),
                masks: Masks::new(now_nanos() ^ (k as u64) << 56),
                closing: None,
                reads: 0,
                wakeups: 0,
                delayed_acks,
            };
            let join = std::thread::Builder::new()
                .name(format!("receiver-{k}"))
                .spawn(move || worker.run())
                .map_err(|e| format!("cannot start a receiver thread: {e}"))?;
            let mut clock: libc::clockid_t = 0;
            // SAFETY: the thread is alive (it waits on its channel); clock is written on success.
            let clock = (unsafe { libc::pthread_getcpuclockid(join.as_pthread_t(), &mut clock) } == 0).then_some(clock);
            threads.push(Handle { tx, wake, join: Some(join), clock, subs: 0 });
        }
        Ok(Self { threads, counters })
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Hands a subscribed socket to the thread with the fewest.
    pub fn add(&mut self, sub: NewSub) -> bool {
        let Some(h) = self.threads.iter_mut().min_by_key(|h| h.subs) else {
            return false;
        };
        h.subs += 1;
        h.send(Cmd::Add(Box::new(sub)))
    }

    /// Marks the start of a step (the read and wake-up counts start from there).
    pub fn mark(&self) {
        for h in &self.threads {
            h.send(Cmd::Mark);
        }
    }

    /// CPU seconds the receiver threads used so far (their thread clocks).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for h in &self.threads {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: ts is a valid out-pointer; a stale clock id yields an error, not UB.
            if unsafe { libc::clock_gettime(h.clock?, &mut ts) } != 0 {
                return None;
            }
            total += ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
        Some(total)
    }

    /// Asks every thread to account `step`; returns their reports.
    pub async fn report(&self, step: u32, acked: Arc<Vec<Vec<bool>>>) -> Vec<ThreadReport> {
        let mut replies = Vec::with_capacity(self.threads.len());
        for h in &self.threads {
            let (tx, rx) = oneshot::channel();
            if h.send(Cmd::Report { step, acked: acked.clone(), reply: tx }) {
                replies.push(rx);
            }
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(30), rx).await {
                out.push(r);
            }
        }
        out
    }

    /// Sends every subscriber a close frame, waits (bounded) for the server to end the
    /// connections and for the threads to finish.
    pub async fn close(mut self) {
        let joins: Vec<JoinHandle<()>> = self
            .threads
            .iter_mut()
            .filter_map(|h| {
                h.send(Cmd::Close);
                h.join.take()
            })
            .collect();
        let wait = tokio::task::spawn_blocking(move || {
            for j in joins {
                let _ = j.join();
            }
        });
        let _ = tokio::time::timeout(CLOSE_WAIT + Duration::from_secs(3), wait).await;
    }
}

impl Drop for Receivers {
    /// Threads of a session that ended early still close their sockets and exit.
    fn drop(&mut self) {
        for h in &self.threads {
            if h.join.is_some() {
                h.send(Cmd::Close);
            }
        }
    }
}

/// What one subscriber saw of one step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SubCounts {
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

/// A thread's figures for one step.
struct StepBook {
    step: u32,
    hist: Histogram<u64>,
    /// Per channel, per sequence number: (deliveries, latest delivery's latency in µs).
    per_publish: Vec<Vec<(u32, u32)>>,
    /// Deliveries per sequence number, per connection: `counts[seq][conn]`. One broadcast
    /// touches one contiguous row instead of one scattered vector per subscriber.
    counts: Vec<Vec<u16>>,
}

impl StepBook {
    fn new(step: u32, channels: usize) -> Self {
        Self { step, hist: report::histogram(), per_publish: vec![Vec::new(); channels], counts: Vec::new() }
    }

    fn count(&mut self, seq: usize, conn: usize, conns: usize) {
        if seq >= self.counts.len() {
            self.counts.resize_with(seq + 1, Vec::new);
        }
        let row = &mut self.counts[seq];
        if conn >= row.len() {
            row.resize(conns.max(conn + 1), 0);
        }
        row[conn] = row[conn].saturating_add(1);
    }

    /// Counts connection `conn` (on channel `channel`) against the acknowledged publishes.
    fn account(&self, conn: usize, channel: usize, acked: &[Vec<bool>]) -> SubCounts {
        let acked: &[bool] = acked.get(channel).map(Vec::as_slice).unwrap_or(&[]);
        let mut c = SubCounts::default();
        for seq in 0..self.counts.len().max(acked.len()) {
            let n = self.counts.get(seq).and_then(|row| row.get(conn)).copied().unwrap_or(0);
            let ok = acked.get(seq).copied().unwrap_or(false);
            c.received += u64::from(n);
            c.duplicates += u64::from(n.saturating_sub(1));
            if ok && n == 0 {
                c.missing += 1;
            }
            if !ok && n > 0 {
                c.unexpected += 1;
            }
        }
        c
    }
}

/// A thread's figures, per step not yet accounted.
struct Book {
    steps: Vec<StepBook>,
    accounted_upto: u32,
    channels: usize,
}

impl Book {
    fn step_mut(&mut self, step: u32) -> &mut StepBook {
        // Deliveries come for the newest step almost always: look there first.
        let i = match self.steps.iter().rposition(|s| s.step == step) {
            Some(i) => i,
            None => {
                self.steps.push(StepBook::new(step, self.channels));
                self.steps.len() - 1
            }
        };
        &mut self.steps[i]
    }

    fn take(&mut self, step: u32) -> StepBook {
        self.accounted_upto = self.accounted_upto.max(step);
        let book = match self.steps.iter().position(|s| s.step == step) {
            Some(i) => self.steps.swap_remove(i),
            None => StepBook::new(step, self.channels),
        };
        self.steps.retain(|s| s.step > step);
        book
    }
}

/// Which subscriber a frame came to: its connection index (among the thread's) and channel.
struct To<'a> {
    conn: usize,
    conns: usize,
    channel_index: usize,
    channel: &'a str,
}

/// What a text message was.
#[derive(Debug, PartialEq, Eq)]
enum Text {
    Delivered,
    Late,
    Stray,
    /// A `pusher:ping`: answer with `pusher:pong`.
    Ping,
    Other,
}

/// Parses a `step:seq:nanos` payload (anything after a fourth `:` is padding).
pub fn parse_payload(s: &[u8]) -> Option<(u32, usize, u64)> {
    fn num(b: &[u8]) -> Option<u64> {
        if b.is_empty() || b.len() > 20 {
            return None;
        }
        b.iter()
            .try_fold(0u64, |n, c| c.is_ascii_digit().then(|| n.checked_mul(10)?.checked_add(u64::from(c - b'0')))?)
    }
    let mut it = s.splitn(4, |c| *c == b':');
    let step = u32::try_from(num(it.next()?)?).ok()?;
    let seq = usize::try_from(num(it.next()?)?).ok()?;
    let nanos = num(it.next()?)?;
    Some((step, seq, nanos))
}

/// Handles one text message: records a bench delivery received at `now`.
fn on_text(msg: &[u8], now: u64, to: &To<'_>, book: &mut Book, scratch: &mut Vec<u8>) -> Text {
    let Some(f): Option<Fields<'_>> = locate::locate(msg) else {
        return Text::Stray;
    };
    let Some(event) = f.event else {
        return Text::Other;
    };
    if !event.eq_str("bench", scratch) {
        return if event.eq_str("pusher:ping", scratch) { Text::Ping } else { Text::Other };
    }
    if !f.channel.is_some_and(|c| c.eq_str(to.channel, scratch)) {
        return Text::Stray;
    }
    let Some((step, seq, sent)) = locate::data_string(&f, scratch).and_then(parse_payload) else {
        return Text::Stray;
    };
    if step <= book.accounted_upto {
        return Text::Late;
    }
    if seq >= MAX_SEQ {
        return Text::Stray;
    }
    let us = now.saturating_sub(sent) / 1000;
    let sb = book.step_mut(step);
    report::record(&mut sb.hist, us);
    if let Some(pp) = sb.per_publish.get_mut(to.channel_index) {
        if seq >= pp.len() {
            pp.resize(seq + 1, (0, 0));
        }
        let e = &mut pp[seq];
        e.0 += 1;
        e.1 = e.1.max(u32::try_from(us).unwrap_or(u32::MAX));
    }
    sb.count(seq, to.conn, to.conns);
    Text::Delivered
}

struct Conn {
    stream: Option<TcpStream>,
    /// The TLS session on a `wss://` target.
    tls: Option<Box<ClientConnection>>,
    reader: Reader,
    /// A partial frame left from the last read.
    pending: Vec<u8>,
    /// Replies not yet written.
    out: Vec<u8>,
    /// EPOLLOUT is registered.
    writing: bool,
    channel_index: usize,
    channel: Arc<str>,
}

/// A receiver thread.
struct Worker {
    epfd: OwnedFd,
    wake: Arc<OwnedFd>,
    rx: mpsc::Receiver<Cmd>,
    /// Indexed by epoll token; an ended connection keeps its accounting (`stream` is None).
    conns: Vec<Conn>,
    open: usize,
    rbuf: Vec<u8>,
    /// Ciphertext of one `read()` on a TLS connection (empty until one is added).
    tbuf: Vec<u8>,
    book: Book,
    counters: Arc<Counters>,
    scratch: Vec<u8>,
    masks: Masks,
    /// Set once the tool closes: the deadline for the server's answers.
    closing: Option<Instant>,
    reads: u64,
    wakeups: u64,
    /// Defer ACKs (see [`delay_ack`]).
    delayed_acks: bool,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        loop {
            let timeout = match self.closing {
                Some(deadline) => {
                    if self.open == 0 || Instant::now() >= deadline {
                        return;
                    }
                    50
                }
                None => -1,
            };
            // SAFETY: events is a live buffer of events.len() entries.
            let n = unsafe {
                libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), events.len() as libc::c_int, timeout)
            };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            self.wakeups += 1;
            for ev in events.iter().take(n as usize) {
                let (token, flags) = (ev.u64, ev.events);
                if token == WAKE {
                    if !self.commands() {
                        return;
                    }
                    continue;
                }
                let idx = token as usize;
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.flush(idx);
                }
                if flags & (READ_EVENTS | (libc::EPOLLHUP | libc::EPOLLERR) as u32) != 0 {
                    self.on_readable(idx);
                }
            }
        }
    }

    /// Runs queued commands; false when the thread should stop now.
    fn commands(&mut self) -> bool {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from our eventfd (nonblocking).
        unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Add(sub)) => self.add(*sub),
                Ok(Cmd::Mark) => {
                    self.reads = 0;
                    self.wakeups = 0;
                }
                Ok(Cmd::Report { step, acked, reply }) => {
                    let _ = reply.send(self.account(step, &acked));
                }
                Ok(Cmd::Close) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.close_all();
                    return self.open > 0;
                }
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn add(&mut self, sub: NewSub) {
        let idx = self.conns.len();
        let fd = sub.stream.as_raw_fd();
        self.conns.push(Conn {
            stream: Some(sub.stream),
            tls: sub.tls,
            reader: sub.reader,
            pending: sub.leftover,
            out: Vec::new(),
            writing: false,
            channel_index: sub.channel_index,
            channel: sub.channel,
        });
        self.open += 1;
        if let Err(e) = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, READ_EVENTS, idx as u64) {
            self.end(idx, format!("error: epoll_ctl: {e}"));
            return;
        }
        // Frames that came with the subscription reply are handled now, not at the next read.
        let p = self.conns[idx].pending.len();
        if self.rbuf.len() < p {
            self.rbuf.resize(p, 0);
        }
        let mut len = p;
        if let Some(tls) = self.conns[idx].tls.as_deref_mut() {
            // Records the opening path read but did not hand out: edge-triggered epoll will
            // not report them again.
            match drain_plaintext(tls, &mut self.rbuf, p) {
                Ok(n) => len = n,
                Err(how) => {
                    self.end(idx, how);
                    return;
                }
            }
        }
        if len > 0 {
            self.rbuf[..p].copy_from_slice(&self.conns[idx].pending);
            self.consume(idx, len, now_nanos());
            self.flush(idx);
        }
    }

    fn account(&mut self, step: u32, acked: &[Vec<bool>]) -> ThreadReport {
        let mut book = self.book.take(step);
        let mut r = ThreadReport {
            hist: std::mem::replace(&mut book.hist, report::histogram()),
            received: 0,
            missing: 0,
            duplicates: 0,
            unexpected: 0,
            per_publish: std::mem::take(&mut book.per_publish),
            reads: std::mem::take(&mut self.reads),
            wakeups: std::mem::take(&mut self.wakeups),
        };
        for (i, c) in self.conns.iter().enumerate() {
            let s = book.account(i, c.channel_index, acked);
            r.received += s.received;
            r.missing += s.missing;
            r.duplicates += s.duplicates;
            r.unexpected += s.unexpected;
        }
        r
    }

    fn on_readable(&mut self, idx: usize) {
        if self.conns[idx].tls.is_some() {
            self.on_readable_tls(idx);
            return;
        }
        loop {
            let conn = &mut self.conns[idx];
            let Some(stream) = &conn.stream else {
                return;
            };
            let p = conn.pending.len();
            if self.rbuf.len() < p + CHUNK {
                self.rbuf.resize(p + CHUNK, 0);
            }
            self.rbuf[..p].copy_from_slice(&conn.pending);
            if self.delayed_acks {
                delay_ack(stream.as_raw_fd());
            }
            let read = (&*stream).read(&mut self.rbuf[p..p + CHUNK]);
            match read {
                Ok(0) => {
                    let how = if p > 0 || conn.reader.in_message() { "EOF mid-frame" } else { "EOF" };
                    self.end(idx, how.to_owned());
                    return;
                }
                Ok(n) => {
                    let now = now_nanos();
                    self.reads += 1;
                    if !self.consume(idx, p + n, now) {
                        return;
                    }
                    if n < CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.end(idx, format!("error: {}", e.kind()));
                    return;
                }
            }
        }
        self.flush(idx);
    }

    /// [`Worker::on_readable`] for a TLS connection: one `read()` of ciphertext (the receive
    /// time is taken right after it, as on the plain path), decrypted into `rbuf` after the
    /// partial frame left last time, then decoded the same way.
    fn on_readable_tls(&mut self, idx: usize) {
        loop {
            let Worker { conns, rbuf, tbuf, .. } = self;
            let conn = &mut conns[idx];
            let (Some(stream), Some(tls)) = (&conn.stream, conn.tls.as_deref_mut()) else {
                return;
            };
            if tbuf.len() < CHUNK {
                tbuf.resize(CHUNK, 0);
            }
            if self.delayed_acks {
                delay_ack(stream.as_raw_fd());
            }
            let read = (&*stream).read(&mut tbuf[..CHUNK]);
            match read {
                Ok(0) => {
                    let p = conn.pending.len();
                    let how = if p > 0 || conn.reader.in_message() { "EOF mid-frame" } else { "EOF" };
                    self.end(idx, how.to_owned());
                    return;
                }
                Ok(n) => {
                    let now = now_nanos();
                    self.reads += 1;
                    let p = conn.pending.len();
                    if rbuf.len() < p {
                        rbuf.resize(p, 0);
                    }
                    rbuf[..p].copy_from_slice(&conn.pending);
                    let mut len = p;
                    let mut src = &tbuf[..n];
                    let mut failed = None;
                    while !src.is_empty() {
                        match tls.read_tls(&mut src) {
                            // close_notify came: nothing more is read.
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) => {
                                failed = Some(format!("tls error: {e}"));
                                break;
                            }
                        }
                        match drain_plaintext(tls, rbuf, len) {
                            Ok(l) => len = l,
                            Err(how) => {
                                failed = Some(how);
                                break;
                            }
                        }
                    }
                    if let Some(how) = failed {
                        self.end(idx, how);
                        return;
                    }
                    if !self.consume(idx, len, now) {
                        return;
                    }
                    if n < CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.end(idx, format!("error: {}", e.kind()));
                    return;
                }
            }
        }
        self.flush(idx);
    }

    /// Decodes the frames in `rbuf[..len]` for connection `idx`; false if it ended.
    fn consume(&mut self, idx: usize, len: usize, now: u64) -> bool {
        let Worker { conns, rbuf, book, counters, scratch, masks, .. } = self;
        let nconns = conns.len();
        let conn = &mut conns[idx];
        let mut pos = 0;
        let mut delivered = 0u64;
        let mut ended: Option<String> = None;
        loop {
            let event = match conn.reader.next(&mut rbuf[..len], &mut pos) {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    counters.stray.fetch_add(1, Relaxed);
                    ended = Some(format!("protocol error: {e}"));
                    break;
                }
            };
            match event {
                Event::Text(msg) => match on_text(
                    msg,
                    now,
                    &To { conn: idx, conns: nconns, channel_index: conn.channel_index, channel: &conn.channel },
                    book,
                    scratch,
                ) {
                    Text::Delivered => delivered += 1,
                    Text::Late => {
                        counters.late.fetch_add(1, Relaxed);
                    }
                    Text::Stray => {
                        counters.stray.fetch_add(1, Relaxed);
                    }
                    Text::Ping => {
                        wire::encode_client(wire::OP_TEXT, crate::pusher::PONG.as_bytes(), masks.mask(), &mut conn.out)
                    }
                    Text::Other => {}
                },
                Event::Ping(p) => wire::encode_client(wire::OP_PONG, p, masks.mask(), &mut conn.out),
                Event::Close { code, .. } => {
                    // Answer with the same code, as RFC 6455 asks, then drop the socket.
                    wire::encode_close(code.unwrap_or(1000), masks.mask(), &mut conn.out);
                    ended = Some(match code {
                        Some(c) => format!("close {c}"),
                        None => "close (no code)".to_owned(),
                    });
                    break;
                }
                Event::Pong | Event::Binary => {}
            }
        }
        if delivered > 0 {
            counters.delivered.fetch_add(delivered, Relaxed);
        }
        conn.pending.clear();
        match ended {
            None => {
                conn.pending.extend_from_slice(&rbuf[pos..len]);
                true
            }
            Some(how) => {
                if let Some(s) = &conn.stream {
                    match conn.tls.as_deref_mut() {
                        None => {
                            let _ = (&*s).write(&conn.out);
                        }
                        Some(tls) => {
                            let _ = write_tls(tls, s, &mut conn.out);
                        }
                    }
                }
                self.end(idx, how);
                false
            }
        }
    }

    /// Writes queued replies; waits for EPOLLOUT when the socket is full.
    fn flush(&mut self, idx: usize) {
        let epfd = self.epfd.as_raw_fd();
        let conn = &mut self.conns[idx];
        let Some(stream) = &conn.stream else {
            return;
        };
        let mut failed = None;
        let want = match conn.tls.as_deref_mut() {
            None => {
                while !conn.out.is_empty() {
                    match (&*stream).write(&conn.out) {
                        Ok(n) => {
                            conn.out.drain(..n);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            failed = Some(format!("error: {}", e.kind()));
                            break;
                        }
                    }
                }
                !conn.out.is_empty()
            }
            Some(tls) => match write_tls(tls, stream, &mut conn.out) {
                Ok(want) => want,
                Err(how) => {
                    failed = Some(how);
                    true
                }
            },
        };
        if let Some(how) = failed {
            self.end(idx, how);
            return;
        }
        if want != conn.writing {
            let events = if want { READ_EVENTS | libc::EPOLLOUT as u32 } else { READ_EVENTS };
            if epoll_ctl(epfd, libc::EPOLL_CTL_MOD, stream.as_raw_fd(), events, idx as u64).is_ok() {
                conn.writing = want;
            }
        }
    }

    /// Ends connection `idx` (its accounting stays); counts it unless the tool is closing.
    fn end(&mut self, idx: usize, how: String) {
        let conn = &mut self.conns[idx];
        if let Some(s) = conn.stream.take() {
            // SAFETY: removing a registered descriptor; a failure only means it was not registered.
            unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, s.as_raw_fd(), std::ptr::null_mut()) };
            self.open -= 1;
            if self.closing.is_none() {
                self.counters.ended(how);
            }
        }
        conn.pending = Vec::new();
        conn.out = Vec::new();
        conn.tls = None;
    }

    /// Sends every open connection a close frame; the server's answer (or EOF) ends each.
    fn close_all(&mut self) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(Instant::now() + CLOSE_WAIT);
        for idx in 0..self.conns.len() {
            if self.conns[idx].stream.is_some() {
                let mask = self.masks.mask();
                wire::encode_close(1000, mask, &mut self.conns[idx].out);
                self.flush(idx);
            }
        }
    }
}

/// Moves every byte `tls` has decrypted into `buf[len..]` (growing it); the new length, or
/// why the session failed.
fn drain_plaintext(tls: &mut ClientConnection, buf: &mut Vec<u8>, mut len: usize) -> Result<usize, String> {
    tls.process_new_packets().map_err(|e| format!("tls error: {e}"))?;
    loop {
        if buf.len() - len < 16 * 1024 {
            buf.resize(len + CHUNK, 0);
        }
        match tls.reader().read(&mut buf[len..]) {
            // close_notify: the EOF that follows ends the connection.
            Ok(0) => return Ok(len),
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(len),
            Err(e) => return Err(format!("tls error: {e}")),
        }
    }
}

/// Hands `out` to `tls` to encrypt and writes what the socket takes; whether records are left
/// to write (wait for EPOLLOUT), or why writing failed.
fn write_tls(tls: &mut ClientConnection, stream: &TcpStream, out: &mut Vec<u8>) -> Result<bool, String> {
    if !out.is_empty() {
        // The session takes less than all when its send buffer is at its limit.
        let n = tls.writer().write(out).map_err(|e| format!("tls error: {e}"))?;
        out.drain(..n);
    }
    let mut sock = stream;
    while tls.wants_write() {
        match tls.write_tls(&mut sock) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("error: {}", e.kind())),
        }
    }
    Ok(tls.wants_write() || !out.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::server_frame;

    #[test]
    fn parses_payloads() {
        assert_eq!(parse_payload(b"3:17:123456"), Some((3, 17, 123456)));
        assert_eq!(parse_payload(b"3:17:123456:xxxxxxxx"), Some((3, 17, 123456)));
        assert_eq!(parse_payload(b"3:17"), None);
        assert_eq!(parse_payload(b"x:1:2"), None);
        assert_eq!(parse_payload(b"1:2:"), None);
        assert_eq!(parse_payload(b"1:2:99999999999999999999999"), None);
    }

    fn book() -> Book {
        Book { steps: Vec::new(), accounted_upto: 0, channels: 2 }
    }

    #[test]
    fn records_bench_deliveries_on_its_channel() {
        let to = To { conn: 1, conns: 2, channel_index: 1, channel: "c1" };
        let mut b = book();
        let mut scratch = Vec::new();
        let msg = br#"{"event":"bench","channel":"c1","data":"1:0:1000000"}"#;
        assert_eq!(on_text(msg, 3_000_000, &to, &mut b, &mut scratch), Text::Delivered);
        assert_eq!(on_text(msg, 3_000_000, &to, &mut b, &mut scratch), Text::Delivered);
        let other = br#"{"event":"bench","channel":"c0","data":"1:1:1000000"}"#;
        assert_eq!(on_text(other, 3_000_000, &to, &mut b, &mut scratch), Text::Stray);
        let ping = br#"{"event":"pusher:ping","data":{}}"#;
        assert_eq!(on_text(ping, 0, &to, &mut b, &mut scratch), Text::Ping);
        let count =
            br#"{"event":"pusher_internal:subscription_count","channel":"c1","data":"{\"subscription_count\":2}"}"#;
        assert_eq!(on_text(count, 0, &to, &mut b, &mut scratch), Text::Other);

        let sb = b.take(1);
        assert_eq!(sb.hist.len(), 2);
        assert_eq!(sb.per_publish[1][0], (2, 2000));
        // Publishes 0 and 1 acknowledged on channel 1: 0 came twice, 1 never.
        let acked = vec![vec![], vec![true, true]];
        assert_eq!(sb.account(1, 1, &acked), SubCounts { received: 2, missing: 1, duplicates: 1, unexpected: 0 });
        // Connection 0 got nothing.
        assert_eq!(sb.account(0, 1, &acked), SubCounts { received: 0, missing: 2, duplicates: 0, unexpected: 0 });
        // After the step is accounted, its deliveries are late.
        assert_eq!(on_text(msg, 3_000_000, &to, &mut b, &mut scratch), Text::Late);
    }

    #[test]
    fn counts_unexpected_deliveries() {
        let mut sb = StepBook::new(2, 1);
        sb.count(0, 0, 1);
        sb.count(3, 0, 1);
        let s = sb.account(0, 0, &[vec![true, false]]);
        assert_eq!(s, SubCounts { received: 2, missing: 0, duplicates: 0, unexpected: 1 });
    }

    /// A loopback pair: a "server" end the test writes to and a subscriber end for the receiver.
    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        c.set_nonblocking(true).expect("nonblocking");
        (s, c)
    }

    /// A self-signed P-256 certificate for localhost and 127.0.0.1 (valid until 2126), test only.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVSgAwIBAgIUdM3dIRp/fZ3m+Eqv+ugNliVEZpcwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMzEyMDcxM1oYDzIxMjYxMTA5
MTIwNzEzWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARElFYPTbbkhr0JplJbCFkI9ZHMiMCMLfBoeaU0V3zVKZjKBisA7ZO2
BZeRqPf6SryxkhVJNmJ6IyWPdaoQoc16o4GBMH8wHQYDVR0OBBYEFDBqPjhKJlFe
QaowQBK07OhhzE/qMB8GA1UdIwQYMBaAFDBqPjhKJlFeQaowQBK07OhhzE/qMBoG
A1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAAATAMBgNVHRMBAf8EAjAAMBMGA1UdJQQM
MAoGCCsGAQUFBwMBMAoGCCqGSM49BAMCA0gAMEUCIQDPL/JeIdUFFGnoJHQbr8KI
CwH/s5VvXawQDNfma16wRwIgTFc6vPUJDgiAvTZEsLWn+l4tji/nq3Nj6Mk5c4tk
8Ig=
-----END CERTIFICATE-----
";
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgblJA7EHI84B6IaS5
AvcRfPOv9SOnUU98T5Ckm1gENquhRANCAARElFYPTbbkhr0JplJbCFkI9ZHMiMCM
LfBoeaU0V3zVKZjKBisA7ZO2BZeRqPf6SryxkhVJNmJ6IyWPdaoQoc16
-----END PRIVATE KEY-----
";

    #[test]
    fn a_receiver_thread_decrypts_and_answers_over_tls() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        crate::sys::start_clock();
        let dir = std::env::temp_dir().join(format!("sockudo-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, TEST_CERT).expect("write");
        let client = crate::tls::TlsTarget::new(Some(&ca), "127.0.0.1").expect("client config");
        let _ = std::fs::remove_dir_all(&dir);
        let chain = vec![CertificateDer::from_pem_slice(TEST_CERT.as_bytes()).expect("cert")];
        let key = PrivateKeyDer::from_pem_slice(TEST_KEY.as_bytes()).expect("key");
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");

        let (server_sock, mut client_sock) = pair();
        client_sock.set_nonblocking(false).expect("blocking");
        let server = std::thread::spawn(move || {
            let conn = rustls::ServerConnection::new(Arc::new(server_config)).expect("server conn");
            let mut s = rustls::StreamOwned::new(conn, server_sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).expect("server handshake");
            }
            s
        });
        let mut conn = ClientConnection::new(client.config.clone(), client.name.clone()).expect("client conn");
        while conn.is_handshaking() {
            conn.complete_io(&mut client_sock).expect("client handshake");
        }
        let mut server = server.join().expect("server thread");
        client_sock.set_nonblocking(true).expect("nonblocking");

        let mut rx = Receivers::start(1, 1, true).expect("threads");
        assert!(rx.add(NewSub {
            stream: client_sock,
            leftover: Vec::new(),
            reader: Reader::default(),
            channel_index: 0,
            channel: Arc::from("c"),
            tls: Some(Box::new(conn)),
        }));
        // A delivery larger than one TLS record (16 KiB) and a pusher:ping.
        let sent = now_nanos();
        let pad = "x".repeat(40_000);
        let mut bytes = server_frame(
            true,
            wire::OP_TEXT,
            format!(r#"{{"event":"bench","channel":"c","data":"1:0:{sent}:{pad}"}}"#).as_bytes(),
        );
        bytes.extend(server_frame(true, wire::OP_TEXT, br#"{"event":"pusher:ping","data":{}}"#));
        server.write_all(&bytes).expect("write");
        server.flush().expect("flush");

        // The reply, decrypted: a masked pusher:pong.
        server.sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < 2 + 4 + crate::pusher::PONG.len() {
            let n = server.read(&mut buf).expect("reply");
            assert!(n > 0, "receiver closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let mut pos = 0;
        assert_eq!(Reader::default().next(&mut got, &mut pos), Ok(Some(Event::Text(crate::pusher::PONG.as_bytes()))));

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let reports = rt.block_on(rx.report(1, Arc::new(vec![vec![true]])));
        assert_eq!((reports[0].received, reports[0].missing, reports[0].duplicates), (1, 0, 0));
        rt.block_on(rx.close());
    }

    #[test]
    fn a_receiver_thread_reads_answers_and_accounts() {
        crate::sys::start_clock();
        let mut rx = Receivers::start(1, 1, true).expect("threads");
        let (mut server, client) = pair();
        let sent = now_nanos();
        // One delivery arrives with the subscription reply (leftover), split mid-frame.
        let first = server_frame(
            true,
            wire::OP_TEXT,
            format!(r#"{{"event":"bench","channel":"c","data":"1:0:{sent}"}}"#).as_bytes(),
        );
        let (head, tail) = first.split_at(10);
        assert!(rx.add(NewSub {
            stream: client,
            leftover: head.to_vec(),
            reader: Reader::default(),
            channel_index: 0,
            channel: Arc::from("c"),
            tls: None,
        }));
        server.write_all(tail).expect("write");
        // A fragmented delivery with a WebSocket ping in between, then a pusher:ping.
        let second = format!(r#"{{"event":"bench","channel":"c","data":"1:1:{sent}"}}"#);
        let (a, b) = second.as_bytes().split_at(20);
        let mut bytes = server_frame(false, wire::OP_TEXT, a);
        bytes.extend(server_frame(true, wire::OP_PING, b"p"));
        bytes.extend(server_frame(true, wire::OP_CONTINUATION, b));
        bytes.extend(server_frame(true, wire::OP_TEXT, br#"{"event":"pusher:ping","data":{}}"#));
        server.write_all(&bytes).expect("write");

        // The replies: a masked pong, then a masked pusher:pong.
        server.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let want = 2 + 4 + 1 + 2 + 4 + crate::pusher::PONG.len();
        while got.len() < want {
            let n = server.read(&mut buf).expect("replies");
            assert!(n > 0, "receiver closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let mut reader = Reader::default();
        let mut pos = 0;
        assert_eq!(&got[..2], &[0x80 | wire::OP_PONG, 0x81]);
        assert_eq!(reader.next(&mut got, &mut pos), Ok(Some(Event::Pong)));
        assert_eq!(reader.next(&mut got, &mut pos), Ok(Some(Event::Text(crate::pusher::PONG.as_bytes()))));

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let reports = rt.block_on(rx.report(1, Arc::new(vec![vec![true, true]])));
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].received, reports[0].missing, reports[0].duplicates), (2, 0, 0));
        assert_eq!(reports[0].per_publish[0].iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 1]);

        // A close frame from the server is answered with the same code and counted.
        let mut close = 4100u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"slow");
        server.write_all(&server_frame(true, wire::OP_CLOSE, &close)).expect("write");
        let mut answer = Vec::new();
        let _ = server.read_to_end(&mut answer);
        assert_eq!(&answer[..2], &[0x88, 0x82]);
        let ended = rx.counters.endings.lock().expect("lock").clone();
        assert_eq!(ended.get("close 4100"), Some(&1));
        rt.block_on(rx.close());
    }
}
