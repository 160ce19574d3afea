//! Handshakes: open N connections, C at a time, each as far as `pusher:connection_established`
//! (TCP connect, the TLS handshake on a `wss://` target, the WebSocket upgrade, the welcome),
//! and report the rate, the time of each step and the server's CPU per connection. The
//! connections stay open until the last one is in (so closing them is not in the figures),
//! then they are dropped. Run once plain and once over TLS against fresh servers, the
//! difference is what TLS costs per connection (`benches/tls.sh`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::pusher::{self, Target};
use crate::rawsub::{self, OpenOptions, Welcomed};
use crate::report::{self, progress, Latency};
use crate::sys;

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeParams {
    pub connections: usize,
    pub concurrency: usize,
    pub source_addrs: usize,
}

/// The `handshakes` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakesReport {
    pub scenario: &'static str,
    pub server: String,
    pub tls: bool,
    /// Protocol version, cipher suite and key exchange of the first TLS connection.
    pub tls_session: Option<String>,
    pub params: HandshakeParams,
    pub opened: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    pub seconds: f64,
    pub handshakes_per_second: f64,
    /// From just before the TCP connect to `pusher:connection_established`.
    pub latency: Latency,
    /// TCP connect alone.
    pub tcp_latency: Latency,
    /// The TLS handshake alone (after the TCP connect); absent on a plain target.
    pub tls_latency: Option<Latency>,
    /// The upgrade request to the welcome (after TCP, and TLS if any).
    pub upgrade_latency: Latency,
    pub cpu: sys::CpuUse,
    /// Server CPU-ms per opened connection.
    pub server_cpu_ms_per_handshake: Option<f64>,
    /// This tool's CPU-ms per opened connection (it does the client half of every handshake
    /// on the same cores).
    pub bench_cpu_ms_per_handshake: Option<f64>,
}

impl HandshakesReport {
    pub fn print(&self) {
        let mut t = report::Table::new(
            format!(
                "handshakes: {} connections to pusher:connection_established against {} ({}), {} at a time",
                self.params.connections,
                self.server,
                if self.tls { "wss://" } else { "ws://" },
                self.params.concurrency
            ),
            &["figure", "value"],
        );
        t.kv("opened / failed", format!("{} / {} {:?}", self.opened, self.failed, self.failures));
        if let Some(s) = &self.tls_session {
            t.kv("TLS session", s);
        }
        t.kv("time s", format!("{:.2}", self.seconds));
        t.kv("handshakes/s", format!("{:.0}", self.handshakes_per_second));
        let l = |l: &Latency| format!("{:.2} / {:.2} / {:.2}", l.p50_ms, l.p99_ms, l.max_ms);
        t.kv("connect-to-welcome p50 / p99 / max ms", l(&self.latency));
        t.kv("TCP connect p50 / p99 / max ms", l(&self.tcp_latency));
        if let Some(tls) = &self.tls_latency {
            t.kv("TLS handshake p50 / p99 / max ms", l(tls));
        }
        t.kv("upgrade-to-welcome p50 / p99 / max ms", l(&self.upgrade_latency));
        t.kv(
            "CPU-ms per handshake: server / bench",
            format!(
                "{} / {}",
                report::opt(self.server_cpu_ms_per_handshake, 3),
                report::opt(self.bench_cpu_ms_per_handshake, 3)
            ),
        );
        t.kv(
            &format!("other processes' CPU s ({} cores, {:.1} s)", self.cpu.cores, self.cpu.wall_seconds),
            report::opt(self.cpu.other_cpu_seconds, 2),
        );
        if let Some(f) = &self.first_failure {
            t.kv("first failure", f);
        }
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let params = format!(
            "{} connections over {}, {} at a time",
            self.params.connections,
            if self.tls { "TLS" } else { "plain TCP" },
            self.params.concurrency
        );
        let result = format!(
            "{} opened, {} failed; {:.0} handshakes/s; connect-to-welcome p50 {:.2} / p99 {:.2} ms{}; server CPU-ms per handshake {}; bench {}; other load {} CPU s",
            self.opened,
            self.failed,
            self.handshakes_per_second,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.tls_latency
                .as_ref()
                .map(|t| format!(" (TLS handshake p50 {:.2} / p99 {:.2} ms)", t.p50_ms, t.p99_ms))
                .unwrap_or_default(),
            report::opt(self.server_cpu_ms_per_handshake, 3),
            report::opt(self.bench_cpu_ms_per_handshake, 3),
            report::opt(self.cpu.other_cpu_seconds, 1)
        );
        (params, result)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Runs the `handshakes` scenario.
pub async fn run(
    target: &Target,
    params: HandshakeParams,
    server_pid: Option<u32>,
) -> Result<HandshakesReport, String> {
    let limit = Arc::new(Semaphore::new(params.concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Welcomed, pusher::Failure>>();
    let cpu = sys::CpuMeter::start(server_pid);
    let started = Instant::now();
    for i in 0..params.connections {
        let (target, limit, tx) = (target.clone(), limit.clone(), tx.clone());
        let opts = OpenOptions { source: target.source_for(i, params.source_addrs), ..OpenOptions::default() };
        tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let _ = tx.send(rawsub::open_welcomed(&target, opts).await);
        });
    }
    drop(tx);

    let (mut all, mut tcp, mut tls, mut upgrade) =
        (report::histogram(), report::histogram(), report::histogram(), report::histogram());
    // Held until the end: dropping one would put its close into the measurement.
    let mut held: Vec<Welcomed> = Vec::with_capacity(params.connections);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut failed, mut first_failure, mut tls_session) = (0usize, None, None);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0usize;
    while held.len() + failed < params.connections {
        tokio::select! {
            r = rx.recv() => match r {
                Some(Ok(w)) => {
                    let t = w.timings;
                    report::record(&mut all, micros(t.welcome));
                    report::record(&mut tcp, micros(t.tcp));
                    if let Some(done) = t.tls {
                        report::record(&mut tls, micros(done.saturating_sub(t.tcp)));
                    }
                    report::record(&mut upgrade, micros(t.welcome.saturating_sub(t.tls.unwrap_or(t.tcp))));
                    if tls_session.is_none() {
                        tls_session = w.tls_session.clone();
                    }
                    held.push(w);
                }
                Some(Err(f)) => {
                    failed += 1;
                    *failures.entry(f.stage.name().to_owned()).or_default() += 1;
                    first_failure.get_or_insert_with(|| f.to_string());
                }
                None => break,
            },
            _ = tick.tick() => {
                progress(&format!(
                    "[handshakes] {:>4.0}s open={}/{} (+{}/s) failed={failed}",
                    started.elapsed().as_secs_f64(),
                    held.len(),
                    params.connections,
                    held.len() - last.min(held.len()),
                ));
                last = held.len();
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let opened = held.len();
    progress(&format!("[handshakes] {opened} open, {failed} failed in {seconds:.2}s; closing"));
    drop(held);
    let per = |s: Option<f64>| s.filter(|_| opened > 0).map(|s| s * 1000.0 / opened as f64);
    Ok(HandshakesReport {
        scenario: "handshakes",
        server: format!("{}:{}", target.host, target.port),
        tls: target.tls.is_some(),
        tls_session,
        params,
        opened,
        failed,
        failures,
        first_failure,
        seconds,
        handshakes_per_second: opened as f64 / seconds.max(1e-9),
        latency: Latency::of(&all),
        tcp_latency: Latency::of(&tcp),
        tls_latency: target.tls.is_some().then(|| Latency::of(&tls)),
        upgrade_latency: Latency::of(&upgrade),
        server_cpu_ms_per_handshake: per(cpu.server_cpu_seconds),
        bench_cpu_ms_per_handshake: per(cpu.bench_cpu_seconds),
        cpu,
    })
}
