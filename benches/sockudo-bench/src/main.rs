//! sockudo-bench: a load generator that speaks the Pusher protocol (version 7) to any
//! Pusher-compatible server, given host, port, app id, key and secret.
//!
//! Scenarios (subcommands): `fanout` (publish-to-delivery latency, deliveries/s, loss and
//! duplicates), `saturation` (raise the publish rate until p99 passes a limit), `connections`
//! (idle subscribed connections: connect rate and server memory per connection), `churn`
//! (connect/subscribe/unsubscribe/disconnect cycles per second; with `--metrics-port`, checks
//! that the server returns to its baseline), `flood` (connections and publishes past the
//! saturation point: refusal codes, recovery time), `soak` (do the gauges equal the true
//! counts over a long run) and `handshakes` (connections opened to the welcome per second,
//! with the time of each step; `--tls` for `wss://`). Each prints a progress line once a
//! second on stderr and a table at the end on stdout, or one JSON object with `--json`;
//! `--markdown FILE` appends a summary row for `benches/run.sh`.

mod churn;
mod connections;
mod fanout;
mod flood;
mod handshakes;
mod locate;
mod pusher;
mod rawsub;
mod receiver;
mod report;
mod saturation;
mod soak;
mod stalled;
mod sys;
mod tls;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "sockudo-bench",
    version,
    about = "Pusher-protocol load generator: fanout, saturation, connections, churn"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Debug)]
struct Common {
    /// Server host (for source-address cycling it must be an IPv4 loopback address).
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, global = true, default_value_t = 6001)]
    port: u16,
    #[arg(long, global = true, default_value = "app-id")]
    app_id: String,
    #[arg(long, global = true, default_value = "app-key")]
    key: String,
    #[arg(long, global = true, default_value = "app-secret")]
    secret: String,
    /// Print one JSON object with all figures instead of the table.
    #[arg(long, global = true)]
    json: bool,
    /// The server's process id, for CPU time (/proc/PID/stat) and memory (/proc/PID/status).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Further server processes (other cluster nodes on this machine), comma-separated: their
    /// CPU time is added to the server's (and not counted as other load). Needs --server-pid.
    #[arg(long, global = true, value_delimiter = ',', value_name = "PID,...")]
    also_server_pid: Vec<u32>,
    /// Append a markdown summary row (`| scenario | command | parameters | result |`) to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Timeout in seconds for each step of opening a connection (TCP, handshake, welcome, subscribe).
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    /// Hard limit on the whole scenario in seconds (default: computed from its parameters).
    #[arg(long, global = true)]
    deadline: Option<f64>,
    /// On a shared machine: first wait until other processes use less than this percentage of
    /// it (and before each saturation step); a run or step they disturbed is repeated. 0: off.
    #[arg(long, global = true, default_value_t = 0.0, value_name = "PERCENT")]
    quiet_below: f64,
    /// Longest wait for --quiet-below, in seconds (then the scenario runs anyway).
    #[arg(long, global = true, default_value_t = 300.0)]
    quiet_wait: f64,
    /// Speak TLS: wss:// and https:// (fanout, saturation and handshakes). Every connection
    /// makes a full handshake (no session resumption).
    #[arg(long, global = true)]
    tls: bool,
    /// PEM file of the certificates to trust instead of the system's roots (implies --tls).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The name the server's certificate is checked against (default: --host).
    #[arg(long, global = true, value_name = "NAME")]
    tls_name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// S subscribers on C channels; publish at R/s for T s over the HTTP API; latency, loss, duplicates.
    Fanout(FanoutArgs),
    /// Fan-out steps at a rising rate until p99 passes the limit; reports the knee.
    Saturation(SaturationArgs),
    /// Open N idle subscribed connections; connect rate and server RSS per connection.
    Connections(ConnectionsArgs),
    /// Workers looping connect -> subscribe -> (unsubscribe -> subscribe) -> close, reset or pong timeout.
    Churn(ChurnArgs),
    /// Connection attempts and publishes at a multiple of the saturation rates; codes and recovery.
    Flood(FloodArgs),
    /// Random opens, closes, subscribes and unsubscribes; the gauges must equal the true counts.
    Soak(SoakArgs),
    /// Open N connections to pusher:connection_established (TCP, TLS with --tls, upgrade); rate and CPU per handshake.
    Handshakes(HandshakesArgs),
}

#[derive(Args, Debug)]
struct HandshakesArgs {
    /// Connections to open (held until the last one is in, then dropped).
    #[arg(long, short = 'n', default_value_t = 5000)]
    connections: usize,
    /// Connections being opened at a time.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Loopback source addresses to cycle over (the closed connections' TIME_WAIT spreads over them).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
}

#[derive(Args, Debug)]
struct SubscriberArgs {
    /// Subscribers (one WebSocket connection each).
    #[arg(long, short = 's', default_value_t = 1000)]
    subscribers: usize,
    /// Channels; subscriber i joins channel i mod C, publishes go round-robin over the channels.
    #[arg(long, short = 'c', default_value_t = 1)]
    channels: usize,
    /// Connections opened at a time.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Concurrent publish requests (and keep-alive connections in the HTTP pool).
    #[arg(long, default_value_t = 64)]
    max_inflight: usize,
    /// Seconds to wait after the last publish for in-flight deliveries.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Loopback source addresses to cycle over, 127.0.0.1..=127.0.0.K (default: one per 25,000 connections).
    #[arg(long)]
    source_addrs: Option<usize>,
    /// Spread the subscribers round-robin over these ports on the same host (e.g. two nodes of
    /// a cluster: `--subscribe-ports 6001,6002`); publishes still go to `--port`.
    #[arg(long, value_delimiter = ',', value_name = "P1,P2,...")]
    subscribe_ports: Vec<u16>,
    /// Receiver threads running epoll over the subscribers' sockets (0: half the cores, at least one).
    #[arg(long, default_value_t = 0)]
    receiver_threads: usize,
    /// Subscribers (of --subscribers) that never read after subscribing: slow consumers.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// SO_RCVBUF of the stalled subscribers, set before connecting (small: they back up fast).
    #[arg(long, default_value_t = 4096)]
    stalled_recv_buffer: u32,
    /// Pad each publish's payload to this many bytes (to fill stalled subscribers' queues).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// ACK every read at once, as the kernel does by default, instead of deferring ACKs to the
    /// delayed-ACK timer (which takes them out of the tool's recv() and out of the broadcast).
    #[arg(long)]
    quickack: bool,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    #[command(flatten)]
    subs: SubscriberArgs,
    /// Publishes per second.
    #[arg(long, short = 'r', default_value_t = 20.0)]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long, short = 't', default_value_t = 20.0)]
    duration: f64,
    /// With --stalled N: first run the same settings with none stalled, then with N stalled,
    /// and report the reading subscribers' p99 ratio.
    #[arg(long)]
    stalled_compare: bool,
}

#[derive(Args, Debug)]
struct SaturationArgs {
    #[command(flatten)]
    subs: SubscriberArgs,
    /// Publishes per second of the first step.
    #[arg(long, default_value_t = 50.0)]
    start_rate: f64,
    /// Rate multiplier between steps.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    #[arg(long, default_value_t = 12)]
    max_steps: u32,
    /// Seconds of publishing per step.
    #[arg(long, default_value_t = 10.0)]
    step_duration: f64,
    /// Seconds of rest between steps.
    #[arg(long, default_value_t = 1.0)]
    pause: f64,
    /// Stop once the step's p99 latency passes this many milliseconds.
    #[arg(long, default_value_t = 100.0)]
    p99_limit_ms: f64,
}

#[derive(Args, Debug)]
struct ConnectionsArgs {
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Channels the connections are spread over (one subscription each).
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Connections opened at a time.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Loopback source addresses to cycle over (default: one per 25,000 connections).
    #[arg(long)]
    source_addrs: Option<usize>,
    /// Seconds to wait after the last connect before reading the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Seconds to hold the connections open in all (including the settle time).
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
}

#[derive(Args, Debug)]
struct ChurnArgs {
    /// Concurrent workers, each one connection at a time.
    #[arg(long, short = 'w', default_value_t = 50)]
    workers: usize,
    /// Seconds to run.
    #[arg(long, short = 't', default_value_t = 10.0)]
    duration: f64,
    /// Unsubscribe/resubscribe rounds per connection.
    #[arg(long, default_value_t = 1)]
    resubscribes: usize,
    /// Channels the workers use.
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Loopback source addresses to cycle over (TIME_WAIT spreads over them).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Run this many cycles instead of --duration seconds.
    #[arg(long)]
    cycles: Option<u64>,
    /// How cycles end, as weights: graceful (close frame), reset (SO_LINGER 0), pong (never
    /// answer pings until the server closes with 4201).
    #[arg(long, default_value = "graceful=1", value_parser = churn::parse_mix)]
    mix: churn::Mix,
    /// Percentage of cycles on presence channels (signed with --secret, a user per cycle).
    #[arg(long, default_value_t = 0)]
    presence: u32,
    /// Pong-timeout sockets held at a time (each lasts activity_timeout + pong_timeout).
    #[arg(long, default_value_t = 200)]
    pong_pool: usize,
    /// The server's metrics port (sockudo): warm up, take /stats as the baseline, and check
    /// at the end that counts are 0 and tasks, fds and RSS are back to it.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Cycles of the warm-up (with --metrics-port).
    #[arg(long, default_value_t = 20_000)]
    warmup_cycles: u64,
    /// Longest wait in seconds for the server to drain and return to the baseline.
    #[arg(long, default_value_t = 30.0)]
    settle: f64,
}

#[derive(Args, Debug)]
struct FloodArgs {
    /// Connection attempts per second at the measured saturation point (0: none).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Publishes per second at the measured saturation point (0: none).
    #[arg(long, default_value_t = 0.0)]
    publish_rate: f64,
    /// The flood runs at this multiple of both rates.
    #[arg(long, default_value_t = 2.0)]
    multiple: f64,
    /// Seconds of flood.
    #[arg(long, short = 't', default_value_t = 10.0)]
    duration: f64,
    /// Subscribers of the flooded channel, connected before the flood.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Connected flood sockets held open at most (the rest are reset at once).
    #[arg(long, default_value_t = 10_000)]
    max_held: usize,
    /// Connection attempts, and publishes, in flight at most (beyond: skipped and counted).
    #[arg(long, default_value_t = 2_000)]
    max_inflight: usize,
    /// Seconds after the flood within which a probe client must connect, subscribe and receive.
    #[arg(long, default_value_t = 30.0)]
    recovery_timeout: f64,
    /// Loopback source addresses to cycle over.
    #[arg(long, default_value_t = 8)]
    source_addrs: usize,
}

#[derive(Args, Debug)]
struct SoakArgs {
    /// Minutes to run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The server's metrics port (for /stats and /metrics).
    #[arg(long, default_value_t = 9601)]
    metrics_port: u16,
    #[arg(long, default_value_t = 50)]
    min_connections: usize,
    #[arg(long, default_value_t = 500)]
    max_connections: usize,
    #[arg(long, default_value_t = 40)]
    public_channels: usize,
    #[arg(long, default_value_t = 10)]
    private_channels: usize,
    #[arg(long, default_value_t = 10)]
    presence_channels: usize,
    /// Presence users to draw from (several sockets may join as one user).
    #[arg(long, default_value_t = 30)]
    users: usize,
    /// Operations in flight at most.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Operations started per second at most.
    #[arg(long, default_value_t = 200.0)]
    ops_per_second: f64,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 5.0)]
    checkpoint: f64,
    /// Longest wait in seconds at a checkpoint for /stats to reach the tool's counts.
    #[arg(long, default_value_t = 10.0)]
    settle: f64,
    /// Loopback source addresses to cycle over.
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
}

fn auto_sources(n: usize, given: Option<usize>) -> usize {
    given.unwrap_or_else(|| n.div_ceil(25_000).max(1)).min(254)
}

fn session_params(a: &SubscriberArgs) -> fanout::SessionParams {
    fanout::SessionParams {
        subscribers: a.subscribers,
        channels: a.channels.max(1),
        connect_concurrency: a.connect_concurrency.max(1),
        max_inflight: a.max_inflight.max(1),
        drain_seconds: a.drain,
        source_addrs: auto_sources(a.subscribers, a.source_addrs),
        subscribe_ports: a.subscribe_ports.clone(),
        receiver_threads: a.receiver_threads,
        stalled: a.stalled,
        stalled_recv_buffer: a.stalled_recv_buffer,
        payload_bytes: a.payload_bytes,
        quickack: a.quickack,
    }
}

/// Time to open `n` connections `conc` at a time, each step bounded by `timeout`, with margin.
fn open_budget(n: usize, conc: usize, timeout: f64) -> f64 {
    n.div_ceil(conc.max(1)) as f64 * 4.0 * timeout + 30.0
}

/// Flags left out of the command shown in the markdown row: output flags, and the target's
/// address and credentials (a results file states them once).
const UNSHOWN: &[&str] = &[
    "--markdown",
    "--server-pid",
    "--also-server-pid",
    "--host",
    "--port",
    "--app-id",
    "--key",
    "--secret",
    "--quiet-below",
    "--quiet-wait",
    "--ca",
];

/// The command line as given, without the flags in [`UNSHOWN`] and `--json`.
fn command_line(args: impl Iterator<Item = String>) -> String {
    let mut out = vec!["sockudo-bench".to_owned()];
    let mut args = args.skip(1);
    while let Some(a) = args.next() {
        if a == "--json" || UNSHOWN.iter().any(|f| a.starts_with(&format!("{f}="))) {
            continue;
        }
        if UNSHOWN.contains(&a.as_str()) {
            args.next();
            continue;
        }
        out.push(a);
    }
    out.join(" ")
}

fn emit<T: Serialize>(common: &Common, report: &T, print: impl FnOnce(), md: (String, String), scenario: &str) {
    if common.json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot encode the report: {e}"),
        }
    } else {
        print();
    }
    if let Some(path) = &common.markdown {
        let command = format!("`{}`", command_line(std::env::args()));
        let params = format!("{command}<br>{}", md.0);
        if let Err(e) = report::append_markdown(path, scenario, &params, &md.1) {
            eprintln!("cannot append to {}: {e}", path.display());
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let c = &cli.common;
    let timeout = sys::secs(c.timeout.max(0.1));
    let tls = if c.tls || c.ca.is_some() {
        let speaks_tls =
            matches!(cli.scenario, Scenario::Fanout(_) | Scenario::Saturation(_) | Scenario::Handshakes(_));
        if !speaks_tls {
            return Err("--tls: only fanout, saturation and handshakes speak TLS".into());
        }
        Some(tls::TlsTarget::new(c.ca.as_deref(), c.tls_name.as_deref().unwrap_or(&c.host))?)
    } else {
        None
    };
    let target = pusher::Target::resolve(&c.host, c.port, &c.app_id, &c.key, &c.secret, timeout, tls).await?;
    let nofile = sys::raise_nofile_limit();
    let budget = match &cli.scenario {
        Scenario::Fanout(a) => {
            // Two runs with --stalled-compare; draining stalled subscribers takes up to 20 s.
            let runs = if a.stalled_compare && a.subs.stalled > 0 { 2.0 } else { 1.0 };
            runs * (open_budget(a.subs.subscribers, a.subs.connect_concurrency, c.timeout)
                + a.duration
                + a.subs.drain
                + 60.0)
                + if a.subs.stalled > 0 { 30.0 } else { 0.0 }
        }
        Scenario::Saturation(a) => {
            open_budget(a.subs.subscribers, a.subs.connect_concurrency, c.timeout)
                + f64::from(a.max_steps + 1)
                    * (a.step_duration
                        + a.subs.drain
                        + a.pause
                        + 30.0
                        + c.quiet_wait.max(0.0) * f64::from(u8::from(c.quiet_below > 0.0)))
        }
        Scenario::Connections(a) => open_budget(a.connections, a.concurrency, c.timeout) + a.hold.max(a.settle) + 100.0,
        Scenario::Churn(a) => {
            // A cycle count has no duration: allow 100 cycles a second, plus the warm-up and
            // the pong-timeout sockets still open at the end.
            let run = a.cycles.map(|n| n as f64 / 100.0).unwrap_or(a.duration);
            let warmup = if a.metrics_port.is_some() { a.warmup_cycles as f64 / 100.0 } else { 0.0 };
            run + warmup + 6.0 * c.timeout + 2.0 * a.settle + 300.0
        }
        Scenario::Flood(a) => a.duration + a.recovery_timeout + 6.0 * c.timeout + 60.0,
        Scenario::Soak(a) => a.minutes * 60.0 + 2.0 * (a.settle + 4.0 * c.timeout) + 60.0,
        Scenario::Handshakes(a) => open_budget(a.connections, a.concurrency, c.timeout) + 60.0,
    };
    let quiet = (c.quiet_below / 100.0).clamp(0.0, 1.0);
    // With --quiet-below, a waiting period, and a disturbed fanout or churn run is repeated.
    let budget = if quiet > 0.0 { budget * 2.0 + c.quiet_wait * 3.0 } else { budget };
    let deadline = sys::secs(c.deadline.unwrap_or(budget));
    let work = async {
        if quiet > 0.0 {
            sys::wait_quiet(quiet, sys::secs(c.quiet_wait), c.server_pid).await;
        }
        match &cli.scenario {
            Scenario::Fanout(a) => {
                let r = fanout::run(
                    &target,
                    session_params(&a.subs),
                    a.rate.max(0.01),
                    sys::secs(a.duration),
                    c.server_pid,
                    sys::Quiet { below: quiet, wait: sys::secs(c.quiet_wait) },
                    a.stalled_compare,
                )
                .await?;
                emit(c, &r, || r.print(), r.markdown(), "fan-out");
            }
            Scenario::Saturation(a) => {
                let ramp = saturation::Ramp {
                    start_rate: a.start_rate,
                    factor: a.factor,
                    max_steps: a.max_steps,
                    step_seconds: a.step_duration,
                    pause_seconds: a.pause,
                    p99_limit_ms: a.p99_limit_ms,
                    quiet_below: quiet,
                    quiet_wait_seconds: c.quiet_wait,
                };
                let r = saturation::run(&target, session_params(&a.subs), ramp, c.server_pid).await?;
                emit(c, &r, || r.print(), r.markdown(), "saturation");
            }
            Scenario::Connections(a) => {
                let params = connections::ConnParams {
                    connections: a.connections,
                    channels: a.channels.max(1),
                    concurrency: a.concurrency.max(1),
                    source_addrs: auto_sources(a.connections, a.source_addrs),
                    settle_seconds: a.settle,
                    hold_seconds: a.hold,
                };
                let r = connections::run(&target, params, c.server_pid, nofile).await?;
                emit(c, &r, || r.print(), r.markdown(), "connections");
            }
            Scenario::Churn(a) => {
                let params = churn::ChurnParams {
                    workers: a.workers.max(1),
                    duration_seconds: a.duration,
                    cycles: a.cycles,
                    resubscribes: a.resubscribes,
                    channels: a.channels.max(1),
                    source_addrs: a.source_addrs.min(254),
                    mix: a.mix,
                    presence_percent: a.presence.min(100),
                    pong_pool: a.pong_pool.max(1),
                    warmup_cycles: a.warmup_cycles,
                    metrics_port: a.metrics_port,
                    settle_seconds: a.settle,
                };
                let mut r = churn::run(&target, params.clone(), c.server_pid).await?;
                let other = r.cpu.other_share().unwrap_or(0.0);
                if quiet > 0.0 && other >= quiet {
                    report::progress(&format!(
                        "[churn] other processes used {:.0}% of the machine; repeating the run",
                        other * 100.0
                    ));
                    sys::wait_quiet(quiet, sys::secs(c.quiet_wait), c.server_pid).await;
                    r = churn::run(&target, params, c.server_pid).await?;
                    r.repeated_for_other_load = true;
                }
                emit(c, &r, || r.print(), r.markdown(), "churn");
                if !r.passed() {
                    return Err("churn: the server did not return to its baseline (see the checks)".into());
                }
            }
            Scenario::Flood(a) => {
                let params = flood::FloodParams {
                    connect_rate: a.connect_rate.max(0.0),
                    publish_rate: a.publish_rate.max(0.0),
                    multiple: a.multiple.max(0.0),
                    duration_seconds: a.duration,
                    subscribers: a.subscribers,
                    max_held: a.max_held,
                    max_inflight: a.max_inflight.max(1),
                    recovery_timeout_seconds: a.recovery_timeout,
                    source_addrs: a.source_addrs.min(254),
                };
                let r = flood::run(&target, params, c.server_pid).await?;
                emit(c, &r, || r.print(), r.markdown(), "flood");
                if !r.passed() {
                    return Err("flood: the server died or did not recover in time".into());
                }
            }
            Scenario::Soak(a) => {
                let params = soak::SoakParams {
                    minutes: a.minutes,
                    min_connections: a.min_connections,
                    max_connections: a.max_connections,
                    public_channels: a.public_channels,
                    private_channels: a.private_channels,
                    presence_channels: a.presence_channels,
                    users: a.users,
                    inflight: a.inflight.max(1),
                    ops_per_second: a.ops_per_second,
                    checkpoint_seconds: a.checkpoint,
                    settle_seconds: a.settle,
                    metrics_port: a.metrics_port,
                    source_addrs: a.source_addrs.min(254),
                };
                let r = soak::run(&target, params).await?;
                emit(c, &r, || r.print(), r.markdown(), "soak");
                if !r.passed() {
                    return Err("soak: mismatches or failed operations (see the report)".into());
                }
            }
            Scenario::Handshakes(a) => {
                let params = handshakes::HandshakeParams {
                    connections: a.connections,
                    concurrency: a.concurrency.max(1),
                    source_addrs: a.source_addrs.min(254),
                };
                let r = handshakes::run(&target, params, c.server_pid).await?;
                emit(c, &r, || r.print(), r.markdown(), "handshakes");
                if r.opened == 0 && r.params.connections > 0 {
                    return Err(format!("handshakes: no connection opened ({})", r.first_failure.unwrap_or_default()));
                }
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("the scenario passed its deadline of {:.0} s", deadline.as_secs_f64())),
    }
}

fn main() -> ExitCode {
    sys::start_clock();
    let cli = Cli::parse();
    sys::set_also_server_pids(&cli.common.also_server_pid);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sockudo-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Do not wait for connection tasks still winding down.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockudo-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_go_after_the_subcommand_too() {
        let cli = Cli::try_parse_from(["b", "fanout", "--port", "7000", "--rate", "5", "--json"]).expect("parses");
        assert_eq!(cli.common.port, 7000);
        assert!(cli.common.json);
    }

    #[test]
    fn parses_subscribe_ports() {
        let cli = Cli::try_parse_from(["b", "fanout", "--subscribe-ports", "7000,7001", "--also-server-pid", "5,6"])
            .expect("parses");
        let Scenario::Fanout(a) = cli.scenario else { panic!("fanout") };
        assert_eq!(a.subs.subscribe_ports, vec![7000, 7001]);
        assert_eq!(cli.common.also_server_pid, vec![5, 6]);
    }

    #[test]
    fn shows_the_command_without_target_flags() {
        let args = ["b", "--port", "1", "fanout", "--rate", "5", "--json", "--secret=x", "--markdown", "f.md"];
        assert_eq!(command_line(args.iter().map(|s| (*s).to_owned())), "sockudo-bench fanout --rate 5");
    }

    #[test]
    fn hides_the_ca_path() {
        let args = ["b", "--tls", "--ca", "/tmp/x/ca.pem", "handshakes", "-n", "10"];
        assert_eq!(command_line(args.iter().map(|s| (*s).to_owned())), "sockudo-bench --tls handshakes -n 10");
    }

    #[test]
    fn picks_source_addresses() {
        assert_eq!(auto_sources(10_000, None), 1);
        assert_eq!(auto_sources(60_000, None), 3);
        assert_eq!(auto_sources(10, Some(4)), 4);
    }
}
