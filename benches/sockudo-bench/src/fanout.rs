//! Fan-out: S subscribers on C channels, a publisher on the signed HTTP API at R events/s.
//!
//! A [`Session`] holds the subscribed connections; each [`Session::run_step`] publishes at one
//! rate for a while (the saturation scenario runs several steps on the same session). Every
//! payload is `step:seq:nanos` (then `:` and padding up to `--payload-bytes`) — the step
//! number, the sequence number within its channel and the tool's monotonic clock read just
//! before the HTTP request is built and sent. Subscribers are opened by hand ([`rawsub`]) and
//! their sockets handed to a few epoll receiver threads ([`receiver`]) that take the receive
//! time right after each `read()`, record latency in per-thread HdrHistograms and count every
//! sequence number per subscriber. At the end of a step the controller waits for in-flight
//! publishes, drains (until every expected delivery arrived, or `drain` passed), then asks each
//! receiver thread for its histogram and its subscribers' missing / duplicated / unexpected
//! counts against the set of publishes the server acknowledged with 200.
//!
//! With `--stalled N`, N of the subscribers stop reading once subscribed ([`stalled`]); the
//! figures are then the other subscribers', and the report says what the server did with the
//! stalled ones. `--stalled-compare` first runs the same settings with none stalled and gives
//! the ratio of the two p99s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::pusher::{PublishOutcome, Publisher, Target};
use crate::rawsub::{self, OpenOptions};
use crate::receiver::{NewSub, Receivers};
use crate::report::{self, progress, Latency};
use crate::stalled::{self, StalledReport, StalledSub, Watch};
use crate::sys::{self, now_nanos, CpuMeter, CpuUse};

/// How the subscribers and the publisher are set up.
#[derive(Debug, Clone, Serialize)]
pub struct SessionParams {
    pub subscribers: usize,
    pub channels: usize,
    pub connect_concurrency: usize,
    /// Concurrent publish requests (and keep-alive connections in the pool).
    pub max_inflight: usize,
    /// How long to wait after the last publish for in-flight deliveries.
    pub drain_seconds: f64,
    /// Loopback source addresses to cycle over (0: let the kernel choose).
    pub source_addrs: usize,
    /// Ports (on the same host) the subscribers are spread over round-robin (subscriber i
    /// connects to port i mod P); empty: all on the target's port. Publishes always go to the
    /// target's port. For cross-node fan-out through a cluster adapter.
    pub subscribe_ports: Vec<u16>,
    /// Receiver threads (each runs epoll over its share of the subscribers).
    pub receiver_threads: usize,
    /// Subscribers (of `subscribers`) that never read after subscribing.
    pub stalled: usize,
    /// `SO_RCVBUF` of the stalled subscribers, set before connecting.
    pub stalled_recv_buffer: u32,
    /// Publish payloads are padded to this many bytes (0: just `step:seq:nanos`).
    pub payload_bytes: usize,
    /// Acknowledge each read at once (the kernel's default for a receive-only socket) instead
    /// of leaving ACKs to the delayed-ACK timer.
    pub quickack: bool,
}

/// How opening the subscribers went.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectSummary {
    pub requested: usize,
    pub subscribed: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub seconds: f64,
    pub per_second: f64,
    /// Time from TCP connect to `subscription_succeeded`, per connection.
    pub latency: Latency,
    /// Subscribed connections per port (port, count), in the order of `subscribe_ports`
    /// (or the target's port alone).
    pub per_port: Vec<(u16, usize)>,
    /// Subscribed connections that read (the rest are stalled on purpose).
    pub reading: usize,
    pub stalled: usize,
    /// Receiver threads that read them.
    pub receiver_threads: usize,
}

/// Everything measured in one publishing step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub step: u32,
    pub target_rate: f64,
    pub duration_seconds: f64,
    pub published: u64,
    pub achieved_rate: f64,
    pub http_ok: u64,
    pub http_errors: u64,
    pub http_error_kinds: BTreeMap<String, u64>,
    /// Worst delay between a publish's scheduled time and its start (publisher falling behind).
    pub publish_lag_max_ms: f64,
    /// HTTP request round-trip time.
    pub publish_rtt: Latency,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub deliveries_per_second: f64,
    /// Publish-to-delivery latency over all deliveries (to reading subscribers).
    pub latency: Latency,
    /// Per publish, the time until the last subscriber of its channel had it (publishes that
    /// reached all of them).
    pub broadcast_complete: Latency,
    /// Acknowledged publishes that did not reach every reading subscriber of their channel.
    pub broadcasts_incomplete: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// Deliveries of publishes that had not been acknowledged with 200.
    pub unexpected: u64,
    /// Reading subscribers whose connection ended during the step.
    pub subscribers_lost: u64,
    /// How the server ended them ("close 4100", "EOF", ...), since the session opened.
    pub subscriber_endings: BTreeMap<String, u64>,
    /// Deliveries of an earlier step that arrived after it was accounted.
    pub late_from_earlier_steps: u64,
    /// Bench frames that could not be parsed or came on the wrong channel.
    pub stray_frames: u64,
    /// Time from the last publish's response until the last expected delivery (or the drain limit).
    pub drain_ms: f64,
    pub cpu: CpuUse,
    pub server_cpu_seconds_per_million_deliveries: Option<f64>,
    /// The tool's own CPU seconds per million deliveries (the same figure as
    /// `client_cpu_us_per_delivery`, under its older name).
    pub bench_cpu_seconds_per_million_deliveries: Option<f64>,
    /// The whole tool's CPU (publisher, receivers, runtime) per delivery, in microseconds.
    pub client_cpu_us_per_delivery: Option<f64>,
    /// The receiver threads' CPU per delivery, in microseconds.
    pub receiver_cpu_us_per_delivery: Option<f64>,
    /// The whole machine's softirq time per delivery, in microseconds: loopback network
    /// processing and TCP timers (delayed ACKs) run there, charged to whichever process the
    /// tick lands on, so neither the tool's nor the server's figure shows them reliably.
    pub machine_softirq_us_per_delivery: Option<f64>,
    /// Receiver `read()` calls and `epoll_wait` returns per delivery (how well reads batch).
    pub reads_per_delivery: f64,
    pub wakeups_per_delivery: f64,
    /// Server VmRSS when the step started and the largest sample (every 100 ms) during it.
    pub server_rss_start_kb: Option<u64>,
    pub server_rss_max_kb: Option<u64>,
    /// Share of the machine (0..1) that other processes used during the step.
    pub other_load_share: Option<f64>,
}

impl StepResult {
    /// What is wrong with the step, if anything: the limits saturation stops at.
    pub fn problems(&self, p99_limit_ms: Option<f64>) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(limit) = p99_limit_ms {
            if self.latency.p99_ms > limit {
                p.push(format!("p99 {:.2} ms > {limit} ms", self.latency.p99_ms));
            }
        }
        if self.http_errors > 0 {
            p.push(format!("{} HTTP errors", self.http_errors));
        }
        if self.missing > 0 {
            p.push(format!("{} lost", self.missing));
        }
        if self.duplicates > 0 {
            p.push(format!("{} duplicated", self.duplicates));
        }
        if self.subscribers_lost > 0 {
            p.push(format!("{} subscribers disconnected", self.subscribers_lost));
        }
        if self.achieved_rate < 0.9 * self.target_rate {
            p.push(format!("publisher reached only {:.1}/s of {:.1}/s", self.achieved_rate, self.target_rate));
        }
        p
    }

    pub fn table_header() -> &'static [&'static str] {
        &[
            "step",
            "pub/s",
            "achieved",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "lost",
            "dup",
            "http err",
            "srv CPU s/M",
            "client CPU µs/delivery",
            "other load",
        ]
    }

    pub fn table_row(&self) -> Vec<String> {
        vec![
            self.step.to_string(),
            format!("{:.1}", self.target_rate),
            format!("{:.1}", self.achieved_rate),
            format!("{:.0}", self.deliveries_per_second),
            format!("{:.2}", self.latency.p50_ms),
            format!("{:.2}", self.latency.p90_ms),
            format!("{:.2}", self.latency.p99_ms),
            format!("{:.2}", self.latency.max_ms),
            self.missing.to_string(),
            self.duplicates.to_string(),
            self.http_errors.to_string(),
            report::opt(self.server_cpu_seconds_per_million_deliveries, 2),
            report::opt(self.client_cpu_us_per_delivery, 2),
            self.other_load_share.map(|s| format!("{:.0}%", s * 100.0)).unwrap_or_else(|| "n/a".to_owned()),
        ]
    }

    /// The figures every fan-out table shows, as name/value rows.
    fn kv_rows(&self, t: &mut report::Table) {
        t.kv("published (achieved rate)", format!("{} ({:.1}/s)", self.published, self.achieved_rate));
        t.kv("HTTP errors", format!("{} {:?}", self.http_errors, self.http_error_kinds));
        t.kv(
            "publish HTTP RTT p50 / p99 ms",
            format!("{:.2} / {:.2}", self.publish_rtt.p50_ms, self.publish_rtt.p99_ms),
        );
        t.kv("deliveries (expected)", format!("{} ({})", self.deliveries, self.expected_deliveries));
        t.kv("deliveries/s", format!("{:.0}", self.deliveries_per_second));
        t.kv("latency p50 ms", format!("{:.2}", self.latency.p50_ms));
        t.kv("latency p90 ms", format!("{:.2}", self.latency.p90_ms));
        t.kv("latency p99 ms", format!("{:.2}", self.latency.p99_ms));
        t.kv("latency max ms", format!("{:.2}", self.latency.max_ms));
        t.kv(
            "broadcast reached all p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2} ({} incomplete)",
                self.broadcast_complete.p50_ms,
                self.broadcast_complete.p99_ms,
                self.broadcast_complete.max_ms,
                self.broadcasts_incomplete
            ),
        );
        t.kv("lost / duplicated / unexpected", format!("{} / {} / {}", self.missing, self.duplicates, self.unexpected));
        t.kv("subscribers disconnected", format!("{} {:?}", self.subscribers_lost, self.subscriber_endings));
        t.kv(
            "server CPU s (per million deliveries)",
            format!(
                "{} ({})",
                report::opt(self.cpu.server_cpu_seconds, 2),
                report::opt(self.server_cpu_seconds_per_million_deliveries, 2)
            ),
        );
        t.kv(
            "server RSS start / max KB",
            format!("{} / {}", report::opt_u64(self.server_rss_start_kb), report::opt_u64(self.server_rss_max_kb)),
        );
        t.kv(
            &format!("other processes' CPU s ({} cores, {:.1} s)", self.cpu.cores, self.cpu.wall_seconds),
            report::opt(self.cpu.other_cpu_seconds, 2),
        );
        t.kv(
            "client CPU-µs/delivery (whole tool / receiver threads)",
            format!(
                "{} / {} ({:.2} reads, {:.3} wake-ups per delivery)",
                report::opt(self.client_cpu_us_per_delivery, 2),
                report::opt(self.receiver_cpu_us_per_delivery, 2),
                self.reads_per_delivery,
                self.wakeups_per_delivery
            ),
        );
        t.kv("machine softirq CPU-µs/delivery", report::opt(self.machine_softirq_us_per_delivery, 2));
    }

    /// The markdown result cell's core.
    fn summary(&self) -> String {
        format!(
            "{:.0} deliveries/s; latency p50 {:.2} / p90 {:.2} / p99 {:.2} / max {:.2} ms; broadcast reached all p99 {:.2} ms; lost {}, dup {}, HTTP errors {}; server CPU s per million deliveries {}; client CPU-µs/delivery {}; server RSS max {} KB; other load {} CPU s in {:.0} s",
            self.deliveries_per_second,
            self.latency.p50_ms,
            self.latency.p90_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.broadcast_complete.p99_ms,
            self.missing,
            self.duplicates,
            self.http_errors,
            report::opt(self.server_cpu_seconds_per_million_deliveries, 2),
            report::opt(self.client_cpu_us_per_delivery, 2),
            report::opt_u64(self.server_rss_max_kb),
            report::opt(self.cpu.other_cpu_seconds, 1),
            self.cpu.wall_seconds
        )
    }
}

/// Publisher counters shared by the publish tasks and the progress line.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    http_ok: AtomicU64,
    http_err: AtomicU64,
}

/// Receiver threads when not given: half the cores, at least one. Each thread that goes idle
/// between arrivals costs a sleep and a wake-up per few deliveries (measured on 2 cores, 1000
/// subscribers at 20/s: 3.2 CPU-µs per delivery with one thread, 5.9 with two), and the
/// server needs the other cores.
pub fn default_receiver_threads() -> usize {
    (std::thread::available_parallelism().map(usize::from).unwrap_or(1) / 2).max(1)
}

/// Which of `s` subscribers stall: `n` of them, evenly spread (so over the channels too).
fn stalled_indices(s: usize, n: usize) -> Vec<usize> {
    let n = n.min(s);
    (0..n).map(|k| k * s / n).collect()
}

/// The payload of publish `seq` of `step`, padded to `bytes` with `:` and `x`s.
fn payload(step: u32, seq: usize, nanos: u64, bytes: usize) -> String {
    let mut p = format!("{step}:{seq}:{nanos}");
    if bytes > p.len() + 1 {
        p.push(':');
        let pad = bytes - p.len();
        p.extend(std::iter::repeat_n('x', pad));
    }
    p
}

/// Subscribed connections plus the publisher.
pub struct Session {
    params: SessionParams,
    channel_names: Vec<String>,
    /// Reading subscribers per channel (stalled ones are not counted).
    subs_per_channel: Vec<u64>,
    receivers: Receivers,
    stalled: Vec<StalledSub>,
    shared: Arc<Shared>,
    publisher: Publisher,
    server_pid: Option<u32>,
    pub connect: ConnectSummary,
}

impl Session {
    /// Opens and subscribes the subscribers (bounded concurrency, each step bounded in time);
    /// reading ones go to the receiver threads as soon as they are subscribed.
    pub async fn open(target: &Target, params: SessionParams, server_pid: Option<u32>) -> Result<Self, String> {
        let channels = params.channels.max(1);
        if target.tls.is_some() && params.stalled > 0 {
            // Stalled subscribers are watched on their bare sockets (stalled.rs), which know
            // nothing of a TLS session.
            return Err("--stalled is not supported over TLS".into());
        }
        let run_id = format!("{}-{}", std::process::id(), now_nanos() % 1_000_000);
        let channel_names: Vec<String> = (0..channels).map(|c| format!("bench-{run_id}-{c}")).collect();
        let channel_arcs: Vec<Arc<str>> = channel_names.iter().map(|c| Arc::from(c.as_str())).collect();
        let publisher = Publisher::new(target, params.max_inflight)?;
        let threads = if params.receiver_threads == 0 { default_receiver_threads() } else { params.receiver_threads };
        let mut receivers = Receivers::start(threads, channels, !params.quickack)?;

        // One target per subscriber port (all on the target's host and credentials).
        let sub_targets: Vec<Target> = if params.subscribe_ports.is_empty() {
            vec![target.clone()]
        } else {
            params
                .subscribe_ports
                .iter()
                .map(|&p| {
                    let mut t = target.clone();
                    t.port = p;
                    t.addr.set_port(p);
                    t
                })
                .collect()
        };

        let stalled_set = stalled_indices(params.subscribers, params.stalled);
        let started = Instant::now();
        let limit = Arc::new(Semaphore::new(params.connect_concurrency.max(1)));
        let mut opening = JoinSet::new();
        for i in 0..params.subscribers {
            let (target, limit) = (sub_targets[i % sub_targets.len()].clone(), limit.clone());
            let channel = channel_names[i % channels].clone();
            let stall = stalled_set.binary_search(&i).is_ok();
            let opts = OpenOptions {
                source: target.source_for(i, params.source_addrs),
                recv_buffer: stall.then_some(params.stalled_recv_buffer),
                max_segment: stall.then_some(rawsub::STALLED_MSS),
            };
            opening.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let t0 = Instant::now();
                let sub = rawsub::open_subscribed(&target, &channel, opts).await?;
                Ok::<_, crate::pusher::Failure>((i, stall, sub, target.addr, t0.elapsed()))
            });
        }
        let mut subs_per_channel = vec![0u64; channels];
        let mut stalled = Vec::new();
        let mut opened: Vec<usize> = Vec::with_capacity(params.subscribers);
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut hist = report::histogram();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut first_error: Option<String> = None;
        loop {
            tokio::select! {
                joined = opening.join_next() => match joined {
                    Some(Ok(Ok((i, stall, sub, peer, took)))) => {
                        report::record(&mut hist, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                        opened.push(i);
                        if stall {
                            stalled.push(StalledSub { stream: sub.stream, leftover: sub.leftover, reader: sub.reader, local: sub.local, peer });
                        } else {
                            let channel_index = i % channels;
                            subs_per_channel[channel_index] += 1;
                            receivers.add(NewSub {
                                stream: sub.stream,
                                leftover: sub.leftover,
                                reader: sub.reader,
                                channel_index,
                                channel: channel_arcs[channel_index].clone(),
                                tls: sub.tls,
                            });
                        }
                    }
                    Some(Ok(Err(f))) => {
                        first_error.get_or_insert_with(|| f.to_string());
                        *failures.entry(f.stage.name().to_owned()).or_default() += 1;
                    }
                    Some(Err(e)) => *failures.entry(format!("task: {e}")).or_default() += 1,
                    None => break,
                },
                _ = tick.tick() => progress(&format!(
                    "[connect] {:>4.0}s subscribed={}/{} failed={}",
                    started.elapsed().as_secs_f64(), opened.len(), params.subscribers,
                    failures.values().sum::<u64>()
                )),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some(e) = &first_error {
            progress(&format!("[connect] first failure: {e}"));
        }
        if opened.is_empty() && params.subscribers > 0 {
            return Err(format!("no subscriber could connect: {}", first_error.unwrap_or_default()));
        }
        let connect = ConnectSummary {
            requested: params.subscribers,
            subscribed: opened.len(),
            failed: params.subscribers - opened.len(),
            failures,
            seconds,
            per_second: opened.len() as f64 / seconds.max(1e-9),
            latency: Latency::of(&hist),
            per_port: sub_targets
                .iter()
                .enumerate()
                .map(|(k, t)| (t.port, opened.iter().filter(|i| *i % sub_targets.len() == k).count()))
                .collect(),
            reading: opened.len() - stalled.len(),
            stalled: stalled.len(),
            receiver_threads: receivers.threads(),
        };
        Ok(Self {
            params,
            channel_names,
            subs_per_channel,
            receivers,
            stalled,
            shared: Arc::new(Shared::default()),
            publisher,
            server_pid,
            connect,
        })
    }

    /// Publishes at `rate` events/s for `duration`, then drains and accounts.
    pub async fn run_step(&mut self, step: u32, rate: f64, duration: Duration, label: &str) -> StepResult {
        self.run_step_watched(step, rate, duration, label).await.0
    }

    /// [`Session::run_step`], also returning what the watcher saw (RSS, stalled sockets).
    async fn run_step_watched(
        &mut self,
        step: u32,
        rate: f64,
        duration: Duration,
        label: &str,
    ) -> (StepResult, stalled::Watched) {
        let channels = self.channel_names.len();
        let total = (rate * duration.as_secs_f64()).round().max(0.0) as u64;
        let per_channel = |c: usize| -> usize {
            let total = total as usize;
            if c < total {
                (total - c).div_ceil(channels)
            } else {
                0
            }
        };
        let status: Arc<Vec<Vec<AtomicU8>>> =
            Arc::new((0..channels).map(|c| (0..per_channel(c)).map(|_| AtomicU8::new(0)).collect()).collect());
        let error_kinds: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let rtt: Arc<Mutex<Histogram<u64>>> = Arc::new(Mutex::new(report::histogram()));
        let shared = self.shared.clone();
        let counters = self.receivers.counters.clone();
        counters.delivered.store(0, Relaxed);
        shared.sent.store(0, Relaxed);
        shared.http_ok.store(0, Relaxed);
        shared.http_err.store(0, Relaxed);
        let late_before = counters.late.load(Relaxed);
        let stray_before = counters.stray.load(Relaxed);
        let lost_before = counters.disconnects.load(Relaxed);
        let lag_us = Arc::new(AtomicU64::new(0));

        // Progress line, once a second, until the step ends.
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let progress_task = {
            let (shared, counters) = (shared.clone(), counters.clone());
            let label = label.to_owned();
            let lag_us = lag_us.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let mut last = 0u64;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        _ = tick.tick() => {
                            let d = counters.delivered.load(Relaxed);
                            progress(&format!(
                                "[{label}] {:>4.0}s sent={} ok={} err={} delivered={} ({}/s) lag_max={:.1}ms lost_subs={}",
                                started.elapsed().as_secs_f64(),
                                shared.sent.load(Relaxed),
                                shared.http_ok.load(Relaxed),
                                shared.http_err.load(Relaxed),
                                d,
                                d - last.min(d),
                                lag_us.load(Relaxed) as f64 / 1000.0,
                                counters.disconnects.load(Relaxed),
                            ));
                            last = d;
                        }
                    }
                }
            })
        };

        let watch = Watch::start(self.server_pid, self.stalled.iter().map(|s| (s.peer, s.local)).collect());
        let cpu = CpuMeter::start(self.server_pid);
        let receiver_cpu = self.receivers.cpu_seconds();
        self.receivers.mark();
        let inflight = Arc::new(Semaphore::new(self.params.max_inflight.max(1)));
        let payload_bytes = self.params.payload_bytes;
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
        for i in 0..total {
            let deadline = start + interval.mul_f64(i as f64);
            sys::sleep_until(deadline).await;
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break;
            };
            let lag = u64::try_from(deadline.elapsed().as_micros()).unwrap_or(u64::MAX);
            lag_us.fetch_max(lag, Relaxed);
            let c = (i % channels as u64) as usize;
            let seq = (i / channels as u64) as usize;
            let (publisher, channel) = (self.publisher.clone(), self.channel_names[c].clone());
            let (status, error_kinds, rtt, shared) = (status.clone(), error_kinds.clone(), rtt.clone(), shared.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let data = payload(step, seq, now_nanos(), payload_bytes);
                shared.sent.fetch_add(1, Relaxed);
                let outcome = publisher.publish(&channel, &data).await;
                if let Ok(mut h) = rtt.lock() {
                    report::record(&mut h, u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                let kind = match outcome {
                    PublishOutcome::Ok => None,
                    PublishOutcome::Status(s) => Some(format!("HTTP {s}")),
                    PublishOutcome::Transport(e) => {
                        Some(format!("transport: {}", e.chars().take(120).collect::<String>()))
                    }
                };
                match kind {
                    None => {
                        status[c][seq].store(1, Relaxed);
                        shared.http_ok.fetch_add(1, Relaxed);
                    }
                    Some(k) => {
                        status[c][seq].store(2, Relaxed);
                        shared.http_err.fetch_add(1, Relaxed);
                        if let Ok(mut m) = error_kinds.lock() {
                            *m.entry(k).or_default() += 1;
                        }
                    }
                }
                drop(permit);
            });
        }
        let publish_window = start.elapsed();
        // Wait for the in-flight publishes (each is bounded by the HTTP client's timeout).
        let all = u32::try_from(self.params.max_inflight.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(15), inflight.acquire_many(all)).await;
        let published_done = Instant::now();

        let acked: Vec<Vec<bool>> = status.iter().map(|ch| ch.iter().map(|s| s.load(Relaxed) == 1).collect()).collect();
        let expected: u64 = acked
            .iter()
            .zip(&self.subs_per_channel)
            .map(|(ch, subs)| ch.iter().filter(|ok| **ok).count() as u64 * subs)
            .sum();
        let drain = sys::secs(self.params.drain_seconds);
        while counters.delivered.load(Relaxed) < expected && published_done.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drained = Instant::now();
        let cpu_use = cpu.stop();
        let receiver_cpu = self.receivers.cpu_seconds().zip(receiver_cpu).map(|(b, a)| b - a);
        let watched = watch.stop();
        let _ = stop_tx.send(());
        let _ = progress_task.await;

        // Account every subscriber's view of the step, thread by thread.
        let acked = Arc::new(acked);
        let reports = self.receivers.report(step, acked.clone()).await;
        let mut hist = report::histogram();
        let (mut received, mut missing, mut duplicates, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
        let (mut reads, mut wakeups) = (0u64, 0u64);
        for r in &reports {
            let _ = hist.add(&r.hist);
            received += r.received;
            missing += r.missing;
            duplicates += r.duplicates;
            unexpected += r.unexpected;
            reads += r.reads;
            wakeups += r.wakeups;
        }
        // A publish's broadcast is complete when every reading subscriber of its channel had it.
        let mut complete = report::histogram();
        let mut incomplete = 0u64;
        for (c, ch) in acked.iter().enumerate() {
            for (seq, _) in ch.iter().enumerate().filter(|(_, ok)| **ok) {
                let (mut n, mut max) = (0u64, 0u32);
                for r in &reports {
                    if let Some(&(k, us)) = r.per_publish.get(c).and_then(|p| p.get(seq)) {
                        n += u64::from(k);
                        max = max.max(us);
                    }
                }
                if n >= self.subs_per_channel[c] && n > 0 {
                    report::record(&mut complete, u64::from(max));
                } else if self.subs_per_channel[c] > 0 {
                    incomplete += 1;
                }
            }
        }
        let published = shared.sent.load(Relaxed);
        let http_ok = shared.http_ok.load(Relaxed);
        let active = (drained - start).as_secs_f64().max(1e-9);
        let per_million = |cpu: Option<f64>| cpu.filter(|_| received > 0).map(|c| c * 1.0e6 / received as f64);
        let per_delivery = |n: u64| if received > 0 { n as f64 / received as f64 } else { 0.0 };
        let rtt = rtt.lock().map(|h| Latency::of(&h)).unwrap_or_default();
        let error_kinds = error_kinds.lock().map(|m| m.clone()).unwrap_or_default();
        let result = StepResult {
            step,
            target_rate: rate,
            duration_seconds: duration.as_secs_f64(),
            published,
            achieved_rate: published as f64 / publish_window.max(duration).as_secs_f64().max(1e-9),
            http_ok,
            http_errors: shared.http_err.load(Relaxed)
                + published.saturating_sub(http_ok + shared.http_err.load(Relaxed)),
            http_error_kinds: error_kinds,
            publish_lag_max_ms: lag_us.load(Relaxed) as f64 / 1000.0,
            publish_rtt: rtt,
            expected_deliveries: expected,
            deliveries: received,
            deliveries_per_second: received as f64 / active,
            latency: Latency::of(&hist),
            broadcast_complete: Latency::of(&complete),
            broadcasts_incomplete: incomplete,
            missing,
            duplicates,
            unexpected,
            subscribers_lost: counters.disconnects.load(Relaxed) - lost_before,
            subscriber_endings: counters.endings.lock().map(|m| m.clone()).unwrap_or_default(),
            late_from_earlier_steps: counters.late.load(Relaxed) - late_before,
            stray_frames: counters.stray.load(Relaxed) - stray_before,
            drain_ms: (drained - published_done).as_secs_f64() * 1000.0,
            other_load_share: cpu_use.other_share(),
            server_cpu_seconds_per_million_deliveries: per_million(cpu_use.server_cpu_seconds),
            bench_cpu_seconds_per_million_deliveries: per_million(cpu_use.bench_cpu_seconds),
            client_cpu_us_per_delivery: per_million(cpu_use.bench_cpu_seconds),
            receiver_cpu_us_per_delivery: per_million(receiver_cpu),
            machine_softirq_us_per_delivery: per_million(cpu_use.machine_softirq_seconds),
            reads_per_delivery: per_delivery(reads),
            wakeups_per_delivery: per_delivery(wakeups),
            server_rss_start_kb: watched.rss_start_kb,
            server_rss_max_kb: watched.rss_max_kb,
            cpu: cpu_use,
        };
        (result, watched)
    }

    /// Drains the stalled subscribers (they are closed afterwards) and summarises them.
    async fn drain_stalled(&mut self, watched: &stalled::Watched) -> StalledReport {
        let mut tasks = JoinSet::new();
        for (k, s) in std::mem::take(&mut self.stalled).into_iter().enumerate() {
            tasks.spawn(async move { (k, stalled::drain(s, Duration::from_secs(2), Duration::from_secs(20)).await) });
        }
        let mut drained = Vec::new();
        while let Some(j) = tasks.join_next().await {
            if let Ok(d) = j {
                drained.push(d);
            }
        }
        drained.sort_by_key(|(k, _)| *k);
        let drained: Vec<stalled::Drained> = drained.into_iter().map(|(_, d)| d).collect();
        StalledReport::new(self.connect.stalled, self.params.stalled_recv_buffer, watched, &drained)
    }

    /// Closes every subscriber (bounded in time).
    pub async fn close(self) {
        self.receivers.close().await;
    }
}

/// The `fanout` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: SessionParams,
    pub rate: f64,
    pub duration_seconds: f64,
    pub connect: ConnectSummary,
    pub result: StepResult,
    /// With `--stalled`: what the server did with the stalled subscribers.
    pub stalled: Option<StalledReport>,
    /// With `--stalled-compare`: the same settings run first with none stalled.
    pub baseline: Option<StepResult>,
    /// With `--stalled-compare`: reading subscribers' p99 with stalled ones / p99 of the run
    /// without (the slow-consumer isolation figure; 1.0 = unaffected).
    pub p99_ratio: Option<f64>,
    /// No HTTP errors, no lost or duplicated messages, no reading subscriber lost.
    pub clean: bool,
    /// The first run was disturbed by other processes (see `--quiet-below`) and run again.
    pub repeated_for_other_load: bool,
}

impl FanoutReport {
    pub fn print(&self) {
        let r = &self.result;
        let mut title = format!(
            "fan-out: {} subscribers on {} channel(s), {:.1} publishes/s for {:.0} s against {}",
            self.connect.subscribed, self.params.channels, self.rate, self.duration_seconds, self.server
        );
        if self.params.payload_bytes > 0 {
            title.push_str(&format!(", payload {} bytes", self.params.payload_bytes));
        }
        let mut t = report::Table::new(title, &["figure", "value"]);
        t.kv(
            "subscribers connected",
            format!(
                "{}/{} in {:.2} s ({:.0}/s)",
                self.connect.subscribed, self.connect.requested, self.connect.seconds, self.connect.per_second
            ),
        );
        if self.connect.per_port.len() > 1 {
            let ports: Vec<String> = self.connect.per_port.iter().map(|(p, n)| format!("{n} on :{p}")).collect();
            t.kv("subscribers per port (publisher on the target port)", ports.join(", "));
        }
        if let Some(b) = &self.baseline {
            t.kv("-- run 1: none stalled --", "");
            b.kv_rows(&mut t);
            t.kv(&format!("-- run 2: {} stalled --", self.params.stalled), "");
        }
        t.kv("receiver threads", self.connect.receiver_threads);
        if self.params.stalled > 0 {
            t.kv("reading / stalled subscribers", format!("{} / {}", self.connect.reading, self.connect.stalled));
        }
        r.kv_rows(&mut t);
        if let Some(s) = &self.stalled {
            t.kv("stalled closed by the server", format!("{} of {}", s.closed_by_server, s.stalled));
            t.kv("stalled endings", s.endings_text());
            t.kv("stalled close reason", s.close_reason.clone().unwrap_or_else(|| "n/a".to_owned()));
            t.kv("stalled seconds to close (min / median / max)", s.close_times());
            t.kv(
                "stalled drained after the run",
                format!("{} bytes, {} bench frames", s.drained_bytes, s.drained_bench_frames),
            );
        }
        if let (Some(ratio), Some(b)) = (self.p99_ratio, &self.baseline) {
            t.kv(
                "reading subscribers' p99: with stalled / none stalled",
                format!("{:.2} / {:.2} ms = {ratio:.2}", r.latency.p99_ms, b.latency.p99_ms),
            );
        }
        t.kv(
            "verdict",
            if self.clean { "clean (no errors, loss or duplicates)".to_owned() } else { self.problems().join("; ") },
        );
        t.print();
    }

    fn problems(&self) -> Vec<String> {
        let mut p = self.result.problems(None);
        if let Some(b) = &self.baseline {
            p.extend(b.problems(None).into_iter().map(|x| format!("run without stalled: {x}")));
        }
        p
    }

    pub fn markdown(&self) -> (String, String) {
        let r = &self.result;
        let mut params = format!(
            "{} subs x {} ch, {:.0} pub/s, {:.0} s",
            self.connect.subscribed, self.params.channels, self.rate, self.duration_seconds
        );
        if self.params.payload_bytes > 0 {
            params.push_str(&format!(", {} B payloads", self.params.payload_bytes));
        }
        if self.params.stalled > 0 {
            params.push_str(&format!(
                ", {} stalled (SO_RCVBUF {} B){}",
                self.connect.stalled,
                self.params.stalled_recv_buffer,
                if self.baseline.is_some() { ", after a run with none stalled" } else { "" }
            ));
        }
        if self.connect.per_port.len() > 1 {
            let ports: Vec<String> = self.connect.per_port.iter().map(|(_, n)| n.to_string()).collect();
            params.push_str(&format!(", subscribers split {} over {} nodes", ports.join("/"), ports.len()));
        }
        let mut result = r.summary();
        if let Some(s) = &self.stalled {
            result = format!(
                "{} reading: {result}; stalled: {} of {} closed by the server ({}), seconds to close {}",
                self.connect.reading,
                s.closed_by_server,
                s.stalled,
                s.endings_text(),
                s.close_times()
            );
        }
        if let (Some(ratio), Some(b)) = (self.p99_ratio, &self.baseline) {
            result = format!(
                "{result}; p99 with stalled / none stalled {:.2} / {:.2} ms = {ratio:.2} (none stalled: {})",
                r.latency.p99_ms,
                b.latency.p99_ms,
                b.summary()
            );
        }
        if self.repeated_for_other_load {
            result = format!("{result} (second run: other load disturbed the first)");
        }
        (params, result)
    }
}

/// One run: open a session, publish, (drain the stalled), close.
async fn one_run(
    target: &Target,
    params: &SessionParams,
    rate: f64,
    duration: Duration,
    server_pid: Option<u32>,
    quiet: sys::Quiet,
    label: &str,
) -> Result<(ConnectSummary, StepResult, Option<StalledReport>, bool), String> {
    let mut session = Session::open(target, params.clone(), server_pid).await?;
    let (mut result, mut watched) = session.run_step_watched(1, rate, duration, label).await;
    let mut repeated = false;
    let other = result.other_load_share.unwrap_or(0.0);
    // A repeat would find the stalled sockets already closed: only runs without them repeat.
    if quiet.below > 0.0 && other >= quiet.below && params.stalled == 0 {
        progress(&format!("[{label}] other processes used {:.0}% of the machine; repeating the run", other * 100.0));
        sys::wait_quiet(quiet.below, quiet.wait, server_pid).await;
        (result, watched) = session.run_step_watched(2, rate, duration, &format!("{label}, repeated")).await;
        repeated = true;
    }
    let stalled = if params.stalled > 0 { Some(session.drain_stalled(&watched).await) } else { None };
    let connect = session.connect.clone();
    session.close().await;
    Ok((connect, result, stalled, repeated))
}

/// Runs the `fanout` scenario; with `compare` and stalled subscribers, first a run without them.
pub async fn run(
    target: &Target,
    params: SessionParams,
    rate: f64,
    duration: Duration,
    server_pid: Option<u32>,
    quiet: sys::Quiet,
    compare: bool,
) -> Result<FanoutReport, String> {
    let baseline = if compare && params.stalled > 0 {
        let base = SessionParams { stalled: 0, ..params.clone() };
        let (_, result, _, _) =
            one_run(target, &base, rate, duration, server_pid, quiet, "fanout, none stalled").await?;
        if quiet.below > 0.0 {
            sys::wait_quiet(quiet.below, quiet.wait, server_pid).await;
        }
        Some(result)
    } else {
        None
    };
    let label = if params.stalled > 0 { format!("fanout, {} stalled", params.stalled) } else { "fanout".to_owned() };
    let (connect, result, stalled, repeated_for_other_load) =
        one_run(target, &params, rate, duration, server_pid, quiet, &label).await?;
    let p99_ratio =
        baseline.as_ref().filter(|b| b.latency.p99_ms > 0.0).map(|b| result.latency.p99_ms / b.latency.p99_ms);
    let clean = result.problems(None).is_empty()
        && result.unexpected == 0
        && baseline.as_ref().is_none_or(|b| b.problems(None).is_empty() && b.unexpected == 0);
    Ok(FanoutReport {
        scenario: "fanout",
        server: format!("{}:{}", target.host, target.port),
        params,
        rate,
        duration_seconds: duration.as_secs_f64(),
        connect,
        result,
        stalled,
        baseline,
        p99_ratio,
        clean,
        repeated_for_other_load,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_payloads() {
        assert_eq!(payload(3, 17, 123456, 0), "3:17:123456");
        let p = payload(3, 17, 123456, 64);
        assert_eq!(p.len(), 64);
        assert!(p.starts_with("3:17:123456:xxx"));
        assert_eq!(crate::receiver::parse_payload(p.as_bytes()), Some((3, 17, 123456)));
    }

    #[test]
    fn spreads_stalled_subscribers() {
        assert_eq!(stalled_indices(1000, 10), vec![0, 100, 200, 300, 400, 500, 600, 700, 800, 900]);
        assert_eq!(stalled_indices(3, 5), vec![0, 1, 2]);
        assert!(stalled_indices(10, 0).is_empty());
    }
}
