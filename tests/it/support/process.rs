//! The real `sockudo` binary as a child process, configured by environment variables as an
//! operator would, with its stdout captured line by line.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{eventually, Client, KEY, WAIT};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Process {
    pub port: u16,
    pub metrics_port: u16,
    child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts the binary on free ports with `env` and waits until it accepts connections.
    pub async fn start(env: &[(&str, String)]) -> Self {
        Self::start_with_args(&[], env).await
    }

    /// The same, with command-line arguments (such as `--config FILE`).
    pub async fn start_with_args(args: &[&str], env: &[(&str, String)]) -> Self {
        let (port, metrics_port) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sockudo"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", metrics_port.to_string())
            .env("SHUTDOWN_GRACE_PERIOD", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sockudo");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|s| Box::new(s) as Box<_>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let up = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "sockudo did not start: {:?}", lines.lock().unwrap());
        Self { port, metrics_port, child, lines }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&format!("ws://127.0.0.1:{}/app/{KEY}?protocol=7", self.port)).await
    }

    /// Sends a signal by name (`HUP`, `USR1`, ...).
    pub async fn signal(&self, name: &str) {
        let pid = self.child.id().expect("pid").to_string();
        let status = Command::new("kill").args([&format!("-{name}"), &pid]).status().await.unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// The child's process id (for a test's own client to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("pid")
    }

    /// Whether a line of the output so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// SIGKILL: the node dies without a word to the cluster.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("pid").to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        let status =
            tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("exits in time").unwrap();
        assert!(status.success(), "exit status {status:?}");
        // Let the readers drain the pipes.
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if self.lines.lock().unwrap().iter().any(|l| l.contains("stopped")) {
                    break;
                }
            }
        })
        .await;
        self.lines.lock().unwrap().clone()
    }
}
