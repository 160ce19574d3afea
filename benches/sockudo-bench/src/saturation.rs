//! Saturation: fan-out steps on one set of subscribers at a publish rate raised by a factor
//! each step, until the p99 latency passes the limit (100 ms by default) or errors, losses,
//! duplicates, disconnects or a publisher that cannot keep the rate appear. The last good step
//! is the knee, reported in deliveries/s and server CPU seconds per million deliveries.

use std::time::Duration;

use serde::Serialize;

use crate::fanout::{ConnectSummary, Session, SessionParams, StepResult};
use crate::pusher::Target;
use crate::report::{self, progress};
use crate::sys;

/// How the rate is raised.
#[derive(Debug, Clone, Serialize)]
pub struct Ramp {
    pub start_rate: f64,
    pub factor: f64,
    pub max_steps: u32,
    pub step_seconds: f64,
    pub pause_seconds: f64,
    pub p99_limit_ms: f64,
    /// Before each step, wait until other processes use less than this share of the machine
    /// (0: do not wait); a failed step that they disturbed is repeated (at most 3 times).
    pub quiet_below: f64,
    pub quiet_wait_seconds: f64,
}

/// The `saturation` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SaturationReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: SessionParams,
    pub ramp: Ramp,
    pub connect: ConnectSummary,
    pub steps: Vec<StepResult>,
    /// The last step without problems.
    pub knee: Option<StepResult>,
    /// Why the ramp stopped.
    pub stop_reason: String,
}

impl SaturationReport {
    pub fn print(&self) {
        let mut t = report::Table::new(
            format!(
                "saturation: {} subscribers on {} channel(s), x{} per {:.0} s step from {:.1} publishes/s, p99 limit {} ms",
                self.connect.subscribed,
                self.params.channels,
                self.ramp.factor,
                self.ramp.step_seconds,
                self.ramp.start_rate,
                self.ramp.p99_limit_ms
            ),
            StepResult::table_header(),
        );
        for s in &self.steps {
            t.row(s.table_row());
        }
        t.print();
        match &self.knee {
            Some(k) => println!(
                "knee: step {} at {:.1} publishes/s = {:.0} deliveries/s (p99 {:.2} ms), server CPU {} s per million deliveries",
                k.step,
                k.target_rate,
                k.deliveries_per_second,
                k.latency.p99_ms,
                report::opt(k.server_cpu_seconds_per_million_deliveries, 2)
            ),
            None => println!("knee: none (the first step already failed)"),
        }
        println!("stopped: {}", self.stop_reason);
    }

    pub fn markdown(&self) -> (String, String) {
        let params = format!(
            "{} subs x {} ch, from {:.0} pub/s x{} per {:.0} s step, p99 limit {} ms",
            self.connect.subscribed,
            self.params.channels,
            self.ramp.start_rate,
            self.ramp.factor,
            self.ramp.step_seconds,
            self.ramp.p99_limit_ms
        );
        let result = match &self.knee {
            Some(k) => format!(
                "knee {:.0} deliveries/s at {:.0} pub/s (p99 {:.2} ms); CPU s per million deliveries: server {}, bench {}; other load {} CPU s in that step; stopped: {}",
                k.deliveries_per_second,
                k.target_rate,
                k.latency.p99_ms,
                report::opt(k.server_cpu_seconds_per_million_deliveries, 2),
                report::opt(k.bench_cpu_seconds_per_million_deliveries, 2),
                report::opt(k.cpu.other_cpu_seconds, 1),
                self.stop_reason
            ),
            None => format!("no good step; stopped: {}", self.stop_reason),
        };
        (params, result)
    }
}

/// Runs the `saturation` scenario.
pub async fn run(
    target: &Target,
    params: SessionParams,
    ramp: Ramp,
    server_pid: Option<u32>,
) -> Result<SaturationReport, String> {
    let mut session = Session::open(target, params.clone(), server_pid).await?;
    let mut steps: Vec<StepResult> = Vec::new();
    let mut knee = None;
    let mut rate = ramp.start_rate.max(0.1);
    let mut stop_reason = format!("all {} steps passed: the knee is above the last rate", ramp.max_steps);
    let mut step = 0u32;
    // A failed step that other processes disturbed (5% of the machine, or the --quiet-below
    // share if lower) is repeated, at most MAX_REPEATS times in a run.
    const MAX_REPEATS: u32 = 3;
    let disturbed_at = ramp.quiet_below.min(0.05);
    let mut repeats = 0u32;
    while step < ramp.max_steps.max(1) + repeats {
        step += 1;
        if ramp.quiet_below > 0.0 {
            sys::wait_quiet(ramp.quiet_below, sys::secs(ramp.quiet_wait_seconds), server_pid).await;
        }
        let label = format!("step {step} @ {rate:.1}/s");
        let r = session.run_step(step, rate, Duration::from_secs_f64(ramp.step_seconds.max(0.1)), &label).await;
        let problems = r.problems(Some(ramp.p99_limit_ms));
        let other = r.other_load_share.unwrap_or(0.0);
        progress(&format!(
            "[{label}] deliveries/s={:.0} p50={:.2}ms p99={:.2}ms max={:.2}ms lost={} dup={} err={} other_load={:.0}% -> {}",
            r.deliveries_per_second,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.missing,
            r.duplicates,
            r.http_errors,
            other * 100.0,
            if problems.is_empty() { "ok".to_owned() } else { problems.join("; ") }
        ));
        steps.push(r.clone());
        if !problems.is_empty() {
            // Other processes took a share of the machine: the step says little; repeat it.
            if ramp.quiet_below > 0.0 && other >= disturbed_at && repeats < MAX_REPEATS {
                progress(&format!(
                    "[{label}] other processes used {:.0}% of the machine; repeating the step",
                    other * 100.0
                ));
                repeats += 1;
                continue;
            }
            stop_reason = format!("step {step} at {rate:.1} publishes/s: {}", problems.join("; "));
            break;
        }
        knee = Some(r);
        rate *= ramp.factor.max(1.01);
        tokio::time::sleep(Duration::from_secs_f64(ramp.pause_seconds.max(0.0))).await;
    }
    let connect = session.connect.clone();
    let server = format!("{}:{}", target.host, target.port);
    session.close().await;
    Ok(SaturationReport { scenario: "saturation", server, params, ramp, connect, steps, knee, stop_reason })
}
