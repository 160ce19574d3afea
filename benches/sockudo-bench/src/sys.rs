//! Process-level helpers: the tool's monotonic clock, the server's CPU time and resident
//! memory read from `/proc/{pid}`, and raising the open-file limit.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();
static ALSO_SERVER_PIDS: OnceLock<Vec<String>> = OnceLock::new();

/// Further server processes (other nodes of a cluster on this machine) whose CPU time counts
/// as the server's (`--also-server-pid`); call once at start-up.
pub fn set_also_server_pids(pids: &[u32]) {
    let _ = ALSO_SERVER_PIDS.set(pids.iter().map(u32::to_string).collect());
}

/// CPU seconds of the server: `pid` plus the `--also-server-pid` processes.
fn server_cpu_seconds(pid: Option<&str>) -> Option<f64> {
    let first = cpu_seconds(pid?)?;
    let extra: f64 = ALSO_SERVER_PIDS.get().map(|v| v.iter().filter_map(|p| cpu_seconds(p)).sum()).unwrap_or(0.0);
    Some(first + extra)
}

/// Starts the tool's clock; call once at start-up (later calls are harmless).
pub fn start_clock() {
    EPOCH.get_or_init(Instant::now);
}

/// Nanoseconds since the tool started, on the monotonic clock. Publishers put this value in
/// the payload and subscribers (in the same process) subtract it from their own reading.
pub fn now_nanos() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Clock ticks per second, the unit of `utime`/`stime` in `/proc/PID/stat` (100 on Linux).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds consumed so far by process `pid` ("self" for this process).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come field 3 (state) onward, so utime (14) and stime (15) are items 11 and 12.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU seconds the whole machine spent busy so far (all cores; the `cpu` line of `/proc/stat`:
/// user, nice, system, irq, softirq and steal).
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<f64>();
    Some(busy / clock_ticks())
}

/// CPU seconds the whole machine spent in softirq so far (the 7th value of the `cpu` line of
/// `/proc/stat`): network receive processing, and TCP timers such as delayed ACKs.
pub fn machine_softirq_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: f64 = line.split_whitespace().nth(7)?.parse().ok()?;
    Some(v / clock_ticks())
}

/// Resident set size of process `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kb(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time of the server (when its pid is known) and of this tool over an interval.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    server_pid: Option<String>,
    server_start: Option<f64>,
    self_start: Option<f64>,
    machine_start: Option<f64>,
    softirq_start: Option<f64>,
    started: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    /// Server CPU seconds (user + system), when `--server-pid` was given.
    pub server_cpu_seconds: Option<f64>,
    /// This tool's own CPU seconds over the same interval: it shares the machine.
    pub bench_cpu_seconds: Option<f64>,
    /// Busy CPU seconds of the whole machine (all cores) over the interval.
    pub machine_busy_seconds: Option<f64>,
    /// Of those, seconds in softirq (network processing and TCP timers, whoever they ran for).
    pub machine_softirq_seconds: Option<f64>,
    /// Machine busy time not spent by the server or this tool: other load sharing the cores.
    pub other_cpu_seconds: Option<f64>,
    /// Wall-clock seconds of the interval.
    pub wall_seconds: f64,
    /// Cores on this machine (the CPU seconds available per wall second).
    pub cores: usize,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        let server_pid = server_pid.map(|p| p.to_string());
        Self {
            server_start: server_cpu_seconds(server_pid.as_deref()),
            self_start: cpu_seconds("self"),
            machine_start: machine_busy_seconds(),
            softirq_start: machine_softirq_seconds(),
            server_pid,
            started: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let server_now = server_cpu_seconds(self.server_pid.as_deref());
        let server = server_now.zip(self.server_start).map(|(b, a)| b - a);
        let bench = cpu_seconds("self").zip(self.self_start).map(|(b, a)| b - a);
        let machine = machine_busy_seconds().zip(self.machine_start).map(|(b, a)| b - a);
        let softirq = machine_softirq_seconds().zip(self.softirq_start).map(|(b, a)| b - a);
        let other = match (machine, server, bench) {
            (Some(m), Some(s), Some(b)) => Some((m - s - b).max(0.0)),
            _ => None,
        };
        CpuUse {
            server_cpu_seconds: server,
            bench_cpu_seconds: bench,
            machine_busy_seconds: machine,
            machine_softirq_seconds: softirq,
            other_cpu_seconds: other,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        }
    }
}

/// Raises the soft open-file limit to the hard limit and returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

impl CpuUse {
    /// The share of the machine (0..1) that other processes used: load that skews a measurement.
    pub fn other_share(&self) -> Option<f64> {
        let capacity = self.cores as f64 * self.wall_seconds;
        self.other_cpu_seconds.filter(|_| capacity > 0.0).map(|o| o / capacity)
    }
}

/// The `--quiet-below` settings: wait for a share (0..1) of the machine to be free; 0 is off.
#[derive(Debug, Clone, Copy)]
pub struct Quiet {
    pub below: f64,
    pub wait: Duration,
}

/// Waits (at most `max_wait`) until processes other than the server and this tool use less than
/// `below` (0..1) of the machine, sampled over 2 s; returns the seconds waited. For shared
/// machines, where other work would skew a measurement.
pub async fn wait_quiet(below: f64, max_wait: Duration, server_pid: Option<u32>) -> f64 {
    let started = Instant::now();
    let mut said = false;
    loop {
        let meter = CpuMeter::start(server_pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = meter.stop();
        let share = used.other_share().unwrap_or_else(|| {
            let capacity = used.cores as f64 * used.wall_seconds;
            used.machine_busy_seconds.map(|m| m / capacity.max(1e-9)).unwrap_or(0.0)
        });
        if share < below {
            return started.elapsed().as_secs_f64();
        }
        if started.elapsed() >= max_wait {
            crate::report::progress(&format!(
                "[quiet] other processes still use {:.0}% of the machine after {:.0}s; going on",
                share * 100.0,
                started.elapsed().as_secs_f64()
            ));
            return started.elapsed().as_secs_f64();
        }
        if !said {
            crate::report::progress(&format!(
                "[quiet] other processes use {:.0}% of the machine; waiting up to {:.0}s for less than {:.0}%",
                share * 100.0,
                max_wait.as_secs_f64(),
                below * 100.0
            ));
            said = true;
        }
    }
}

/// Sleeps until `deadline`, or returns at once if it has passed.
pub async fn sleep_until(deadline: Instant) {
    tokio::time::sleep_until(deadline.into()).await;
}

/// Seconds as a `Duration`, clamped to something sane for negative or absurd input.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 1.0e6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_figures() {
        assert!(cpu_seconds("self").is_some());
        assert!(rss_kb("self").is_some_and(|kb| kb > 0));
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
        assert!(machine_softirq_seconds().is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn clock_is_monotonic() {
        start_clock();
        let a = now_nanos();
        let b = now_nanos();
        assert!(b >= a);
    }
}
