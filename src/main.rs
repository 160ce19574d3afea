//! The `sockudo` binary: parses the command line, loads and validates the configuration
//! (exit 64 with one line naming the key on error), binds the listeners and runs the server
//! until SIGTERM or Ctrl-C.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use sockudo::config::{self, Config};
use sockudo::server::{self, Listeners};
use sockudo::shutdown;

// The allocator is a build-time choice measured in benches/variants.sh (README, Benchmarks):
// mimalloc by default; `--no-default-features` gives glibc malloc.
#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "alloc-jemalloc", not(feature = "alloc-mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// sysexits.h EX_USAGE / EX_CONFIG family: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

const USAGE: &str = "usage: sockudo [--config FILE] [--check-config]\n\
       sockudo webhooks replay [--config FILE] [--app ID]\n\n\
  --config FILE    JSON or TOML config layered over the embedded default\n\
  --check-config   print the effective configuration (secrets masked) and exit\n\
  --version        print the version\n\
  webhooks replay  move the broker queue's dead-letter webhooks (of app ID only, with --app)\n\
                   back into the queue, and print {\"replayed\": N}";

struct Args {
    config: Option<PathBuf>,
    check: bool,
    /// `webhooks replay`, with the app it is limited to (if any).
    replay: Option<Option<String>>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args { config: None, check: false, replay: None };
    let mut it = std::env::args().skip(1).peekable();
    if it.peek().map(String::as_str) == Some("webhooks") {
        it.next();
        match it.next().as_deref() {
            Some("replay") => args.replay = Some(None),
            _ => return Err(format!("webhooks needs a command: replay\n{USAGE}")),
        }
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "--app" if args.replay.is_some() => args.replay = Some(Some(it.next().ok_or("--app needs an app id")?)),
            "--config" | "-c" => args.config = Some(it.next().ok_or("--config needs a file")?.into()),
            s if s.starts_with("--config=") => args.config = Some(s["--config=".len()..].into()),
            "--check-config" => args.check = true,
            "--version" | "-V" => {
                println!("sockudo {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Some(args))
}

/// Pending connections the kernel may queue per listener. tokio's `bind` asks for 128, which
/// overflows when a few hundred clients reconnect at once (they then wait a second to retry).
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(host: &str, port: u16, key: &str) -> Result<tokio::net::TcpListener, String> {
    let fail = |e: std::io::Error| format!("invalid configuration: {key}: cannot listen on {host}:{port}: {e}");
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(fail)?
        .next()
        .ok_or_else(|| format!("invalid configuration: {key}: {host} does not resolve"))?;
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)
}

async fn listeners(config: &Config) -> Result<Listeners, String> {
    let main = bind(&config.host, config.port, "port").await?;
    // Only the Prometheus driver serves `/metrics`; OTLP-only metrics bind no port.
    let prometheus = config.metrics.driver.split(',').any(|d| d.trim() == "prometheus");
    let metrics = if config.metrics.enabled && prometheus {
        Some(bind(&config.metrics.host, config.metrics.port, "metrics.port").await?)
    } else {
        None
    };
    Ok(Listeners { main, metrics })
}

async fn signal(trigger: shutdown::ShutdownTrigger) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
    trigger.trigger();
}

/// `sockudo webhooks replay`: exit 64 when the queue cannot be replayed (the memory queue, an
/// unreachable broker, or one failing midway; what moved before then stays moved).
fn replay(config: &Config, app: Option<&str>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sockudo::webhooks::replay(config, app)) {
        Ok(n) => {
            println!("{}", serde_json::json!({ "replayed": n }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match config::load(args.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Webhook settings and the TLS files are checked here too, so `--check-config` and startup
    // refuse them alike.
    if let Err(e) = sockudo::webhooks::validate(&config).and_then(|()| sockudo::tls::check(&config)) {
        eprintln!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(app) = &args.replay {
        return replay(&config, app.as_deref());
    }
    if args.check {
        match serde_json::to_string_pretty(&config::mask_secrets(&config)) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // SIGHUP reloads TLS certificates (tls::reload_on_change). Registered before anything
        // binds: tokio keeps the handler for the life of the process, so a SIGHUP that comes
        // before the server listens for it is held, never the default action that would end
        // the process.
        #[cfg(unix)]
        let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let listeners = match listeners(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let (trigger, stop) = shutdown::channel();
        tokio::spawn(signal(trigger));
        match server::run(config, listeners, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => match e.downcast_ref::<config::ConfigError>() {
                // A broker that cannot be reached at startup is a configuration error.
                Some(config_error) => {
                    eprintln!("{config_error}");
                    ExitCode::from(EXIT_CONFIG)
                }
                None => {
                    eprintln!("sockudo failed: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
