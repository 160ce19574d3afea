//! Churn: W concurrent workers, each looping connect → subscribe → (unsubscribe → subscribe)
//! × M → close for T seconds; reports full cycles per second, subscribe and unsubscribe
//! operations per second, failures by stage, cycle time percentiles, and the server's CPU and
//! resident memory before and after (given `--server-pid`) to make leaks visible.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::pusher::{self, Failure, Stage, Target};
use crate::report::{self, progress, Latency};
use crate::sys;

#[derive(Debug, Clone, Serialize)]
pub struct ChurnParams {
    pub workers: usize,
    pub duration_seconds: f64,
    /// Unsubscribe/resubscribe rounds per connection.
    pub resubscribes: usize,
    pub channels: usize,
    pub source_addrs: usize,
}

/// The `churn` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: ChurnParams,
    pub seconds: f64,
    pub cycles: u64,
    pub cycles_per_second: f64,
    pub subscribes_per_second: f64,
    pub unsubscribes_per_second: f64,
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    /// One whole cycle (connect to closed).
    pub cycle_latency: Latency,
    /// TCP connect to `pusher:connection_established`.
    pub connect_latency: Latency,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_ms_per_cycle: Option<f64>,
    pub cpu: sys::CpuUse,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    /// The first run was disturbed by other processes (see `--quiet-below`) and run again.
    pub repeated_for_other_load: bool,
}

impl ChurnReport {
    pub fn print(&self) {
        let mut t = report::Table::new(
            format!(
                "churn: {} workers for {:.0} s, {} resubscribe(s) per connection, against {}",
                self.params.workers, self.params.duration_seconds, self.params.resubscribes, self.server
            ),
            &["figure", "value"],
        );
        t.kv("cycles", self.cycles);
        t.kv("connect/disconnect cycles/s", format!("{:.1}", self.cycles_per_second));
        t.kv("subscribes/s", format!("{:.1}", self.subscribes_per_second));
        t.kv("unsubscribes/s", format!("{:.1}", self.unsubscribes_per_second));
        t.kv("failures", format!("{} {:?}", self.failures.values().sum::<u64>(), self.failures));
        t.kv(
            "cycle p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2}",
                self.cycle_latency.p50_ms, self.cycle_latency.p99_ms, self.cycle_latency.max_ms
            ),
        );
        t.kv(
            "connect p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2}",
                self.connect_latency.p50_ms, self.connect_latency.p99_ms, self.connect_latency.max_ms
            ),
        );
        t.kv(
            "server CPU s (ms per cycle)",
            format!("{} ({})", report::opt(self.server_cpu_seconds, 2), report::opt(self.server_cpu_ms_per_cycle, 3)),
        );
        let kb = |v: Option<u64>| v.map(|x| format!("{x} KB")).unwrap_or_else(|| "n/a".to_owned());
        t.kv(
            "bench / other processes' CPU s",
            format!("{} / {}", report::opt(self.cpu.bench_cpu_seconds, 2), report::opt(self.cpu.other_cpu_seconds, 2)),
        );
        t.kv("server RSS before / after", format!("{} / {}", kb(self.rss_before_kb), kb(self.rss_after_kb)));
        if let Some(f) = &self.first_failure {
            t.kv("first failure", f);
        }
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let params = format!(
            "{} workers, {:.0} s, {} resubscribe(s) per connection",
            self.params.workers, self.params.duration_seconds, self.params.resubscribes
        );
        let result = format!(
            "{:.0} connect/disconnect cycles/s, {:.0} subscribes/s, {:.0} unsubscribes/s; cycle p50 {:.2} / p99 {:.2} ms; {} failures; server CPU {} ms per cycle; other load {} CPU s; server RSS {} -> {} KB",
            self.cycles_per_second,
            self.subscribes_per_second,
            self.unsubscribes_per_second,
            self.cycle_latency.p50_ms,
            self.cycle_latency.p99_ms,
            self.failures.values().sum::<u64>(),
            report::opt(self.server_cpu_ms_per_cycle, 3),
            report::opt(self.cpu.other_cpu_seconds, 1),
            self.rss_before_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            self.rss_after_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
        );
        let result = if self.repeated_for_other_load {
            format!("{result} (second run: other load disturbed the first)")
        } else {
            result
        };
        (params, result)
    }
}

/// Failures by stage, and the first one's text.
type FailureLog = (BTreeMap<String, u64>, Option<String>);

/// One cycle; returns the time to `connection_established`.
async fn cycle(
    target: &Target,
    source: Option<std::net::IpAddr>,
    channel: &str,
    resubscribes: usize,
) -> Result<Duration, Failure> {
    let t0 = Instant::now();
    let mut ws = pusher::open(target, source, pusher::ws_config(false)).await?;
    let connected = t0.elapsed();
    pusher::subscribe(&mut ws, channel, target.timeout).await?;
    for _ in 0..resubscribes {
        ws.send(pusher::unsubscribe_msg(channel))
            .await
            .map_err(|e| Failure { stage: Stage::Unsubscribe, detail: e.to_string() })?;
        pusher::subscribe(&mut ws, channel, target.timeout).await?;
    }
    pusher::close(ws, target.timeout).await?;
    Ok(connected)
}

/// Runs the `churn` scenario.
pub async fn run(target: &Target, params: ChurnParams, server_pid: Option<u32>) -> Result<ChurnReport, String> {
    let pid = server_pid.map(|p| p.to_string());
    let rss = || pid.as_deref().and_then(sys::rss_kb);
    let rss_before = rss();
    let run_id = format!("{}-{}", std::process::id(), sys::now_nanos() % 1_000_000);
    let cycles = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next_conn = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<FailureLog>> = Arc::default();
    let duration = sys::secs(params.duration_seconds);
    let cpu = sys::CpuMeter::start(server_pid);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for w in 0..params.workers.max(1) {
        let (target, cycles, failed, next_conn, failures) =
            (target.clone(), cycles.clone(), failed.clone(), next_conn.clone(), failures.clone());
        let channel = format!("churn-{run_id}-{}", w % params.channels.max(1));
        let (resubscribes, source_addrs) = (params.resubscribes, params.source_addrs);
        workers.spawn(async move {
            let mut cycle_hist = report::histogram();
            let mut connect_hist = report::histogram();
            while Instant::now() < deadline {
                let source = target.source_for(next_conn.fetch_add(1, Relaxed), source_addrs);
                let t0 = Instant::now();
                match cycle(&target, source, &channel, resubscribes).await {
                    Ok(connected) => {
                        report::record(&mut cycle_hist, u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                        report::record(&mut connect_hist, u64::try_from(connected.as_micros()).unwrap_or(u64::MAX));
                        cycles.fetch_add(1, Relaxed);
                    }
                    Err(f) => {
                        failed.fetch_add(1, Relaxed);
                        if let Ok(mut m) = failures.lock() {
                            *m.0.entry(f.stage.name().to_owned()).or_default() += 1;
                            m.1.get_or_insert_with(|| f.to_string());
                        }
                        // Back off a little so a refusing server is not hammered in a tight loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (cycle_hist, connect_hist)
        });
    }

    let mut cycle_hist: Histogram<u64> = report::histogram();
    let mut connect_hist: Histogram<u64> = report::histogram();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0u64;
    // Each cycle is bounded by the per-step timeouts, so the workers end shortly after the deadline.
    let hard_stop = deadline + target.timeout * 6 + Duration::from_secs(5);
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok((c, k))) => {
                    let _ = cycle_hist.add(&c);
                    let _ = connect_hist.add(&k);
                }
                Some(Err(_)) => {}
                None => break,
            },
            _ = tick.tick() => {
                let c = cycles.load(Relaxed);
                progress(&format!(
                    "[churn] {:>4.0}s cycles={c} (+{}/s) failures={}",
                    started.elapsed().as_secs_f64(),
                    c - last.min(c),
                    failed.load(Relaxed)
                ));
                last = c;
                if Instant::now() > hard_stop {
                    workers.abort_all();
                }
            }
        }
    }
    // All workers have ended: cycles that finished after the deadline are counted, and so is their time.
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let cpu_use = cpu.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss();
    let n = cycles.load(Relaxed);
    let (failures, first_failure) = failures.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(ChurnReport {
        scenario: "churn",
        server: format!("{}:{}", target.host, target.port),
        seconds,
        cycles: n,
        cycles_per_second: n as f64 / seconds,
        subscribes_per_second: (n * (1 + params.resubscribes as u64)) as f64 / seconds,
        unsubscribes_per_second: (n * params.resubscribes as u64) as f64 / seconds,
        failures,
        first_failure,
        cycle_latency: Latency::of(&cycle_hist),
        connect_latency: Latency::of(&connect_hist),
        server_cpu_seconds: cpu_use.server_cpu_seconds,
        server_cpu_ms_per_cycle: cpu_use.server_cpu_seconds.filter(|_| n > 0).map(|s| s * 1000.0 / n as f64),
        cpu: cpu_use,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        params,
        repeated_for_other_load: false,
    })
}
