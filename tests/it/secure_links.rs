//! Broker links that production uses: Redis over TLS with an ACL user, a Sentinel-managed
//! master followed across a failover, a three-master Redis Cluster on sharded pub/sub, and NATS
//! over TLS with a password, a token or an nkey. Each test starts its own servers on free ports
//! (killed on drop) and runs the cluster scenarios of `cluster.rs` on them; startup failures
//! (a wrong password, an untrusted CA, an unreadable CA file) exit 64 naming the key.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sockudo::config::{NatsConfig, RedisConfig};

use crate::cluster::{
    broadcast_reaches_every_node_and_excludes_the_socket, cache_counts_and_channel_queries_are_shared,
    presence_is_cluster_wide_and_once_per_user, stop_all, Broker,
};
use crate::support::process::free_port;
use crate::support::tls::TestCa;
use crate::support::*;

const ACL_USER: &str = "sockudo";
const ACL_PASSWORD: &str = "s3cret-acl";

/// Server processes and their folder, gone when the test ends however it ends.
struct Servers {
    dir: PathBuf,
    children: Vec<(u16, tokio::process::Child)>,
}

impl Servers {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sockudo-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, children: Vec::new() }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `program args` and waits until `port` accepts connections.
    async fn spawn(&mut self, port: u16, program: &str, args: &[&str]) {
        let child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        self.children.push((port, child));
        let up = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "{program} {args:?} did not listen on {port}");
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p port args...` (plain TCP), its output trimmed.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.expect("redis-cli in time").unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A TLS-only Redis (no plain port) whose default user is off and whose one ACL user is
/// `sockudo`; returns its TLS port.
async fn redis_tls(servers: &mut Servers, ca: &TestCa) -> u16 {
    let cert = ca.issue("redis");
    let port = free_port();
    let conf = format!(
        "port 0\nbind 127.0.0.1\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
         tls-auth-clients no\nsave \"\"\nappendonly no\nuser default off\n\
         user {ACL_USER} on >{ACL_PASSWORD} ~* &* +@all\n",
        cert.cert.display(),
        cert.key.display(),
        ca.ca_path().display(),
    );
    let conf = servers.write("redis-tls.conf", &conf);
    servers.spawn(port, "redis-server", &[conf.to_str().unwrap()]).await;
    port
}

fn redis_config(url: String, ca: &Path) -> RedisConfig {
    RedisConfig { url, ca_path: ca.display().to_string(), ..RedisConfig::default() }
}

/// The three main scenarios, one after the other, on `broker`.
async fn scenarios(broker: Broker) {
    broadcast_reaches_every_node_and_excludes_the_socket(broker.clone()).await;
    presence_is_cluster_wide_and_once_per_user(broker.clone()).await;
    cache_counts_and_channel_queries_are_shared(broker).await;
}

#[tokio::test]
async fn redis_tls_with_an_acl_user() {
    let ca = TestCa::new("redis-tls");
    let mut servers = Servers::new("redis-tls");
    let port = redis_tls(&mut servers, &ca).await;
    let url = format!("rediss://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}");
    let broker = Broker::RedisWith(Box::new(redis_config(url, &ca.ca_path())));
    scenarios(broker.clone()).await;
    // The shared rate limiter takes the same settings: these nodes start only if it connects.
    let nodes = broker.cluster_with(2, |c| c.rate_limits.driver = "redis".into()).await;
    assert_eq!(nodes[0].publish("limited", "e", "1").await.0, 200);
    stop_all(nodes).await;
}

/// The binary with `env` (an operator's variables): its exit code and stderr.
async fn run_binary(env: &[(&str, String)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sockudo"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", free_port().to_string())
        .env("METRICS_ENABLED", "false");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("exits in time").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn redis_wrong_password_untrusted_ca_or_unreadable_ca_exit_64_naming_the_key() {
    let ca = TestCa::new("redis-bad");
    let other = TestCa::new("redis-other");
    let mut servers = Servers::new("redis-bad");
    let port = redis_tls(&mut servers, &ca).await;
    let good_ca = ca.ca_path().display().to_string();
    let cases = [
        (
            "wrong password",
            format!("rediss://{ACL_USER}:hunter2@127.0.0.1:{port}"),
            good_ca.clone(),
            "adapter.redis.url",
        ),
        (
            "untrusted CA",
            format!("rediss://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}"),
            other.ca_path().display().to_string(),
            "adapter.redis.url",
        ),
        (
            "unreadable CA file",
            format!("rediss://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}"),
            "/nonexistent/ca.pem".to_owned(),
            "adapter.redis.ca_path",
        ),
    ];
    for (case, url, ca_path, key) in cases {
        let (code, err) =
            run_binary(&[("ADAPTER_DRIVER", "redis".into()), ("REDIS_URL", url), ("REDIS_CA_PATH", ca_path)]).await;
        assert_eq!(code, Some(64), "{case}: {err}");
        assert!(err.contains(key), "{case}: {err}");
        assert!(!err.contains("hunter2") && !err.contains(ACL_PASSWORD), "{case}: password leaked: {err}");
    }
}

/// A TLS-only `nats-server` with `authorization` (a config block); returns its port.
async fn nats_tls(servers: &mut Servers, ca: &TestCa, authorization: &str) -> u16 {
    let cert = ca.issue("nats");
    let port = free_port();
    let conf = format!(
        "listen: \"127.0.0.1:{port}\"\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         authorization {{\n{authorization}\n}}\n",
        cert.cert.display(),
        cert.key.display(),
    );
    let conf = servers.write("nats.conf", &conf);
    servers.spawn(port, "nats-server", &["-c", conf.to_str().unwrap()]).await;
    port
}

fn nats_config(port: u16, ca: &TestCa) -> NatsConfig {
    NatsConfig {
        servers: vec![format!("tls://127.0.0.1:{port}")],
        ca_path: ca.ca_path().display().to_string(),
        ..NatsConfig::default()
    }
}

#[tokio::test]
async fn nats_tls_with_a_password() {
    let ca = TestCa::new("nats-pw");
    let mut servers = Servers::new("nats-pw");
    let port = nats_tls(&mut servers, &ca, "  user: sockudo\n  password: \"s3cret-nats\"").await;
    let config = NatsConfig { username: "sockudo".into(), password: "s3cret-nats".into(), ..nats_config(port, &ca) };
    scenarios(Broker::NatsWith(Box::new(config))).await;
}

#[tokio::test]
async fn nats_tls_with_a_token() {
    let ca = TestCa::new("nats-token");
    let mut servers = Servers::new("nats-token");
    let port = nats_tls(&mut servers, &ca, "  token: \"t0ken-nats\"").await;
    let config = NatsConfig { token: "t0ken-nats".into(), ..nats_config(port, &ca) };
    broadcast_reaches_every_node_and_excludes_the_socket(Broker::NatsWith(Box::new(config))).await;
}

/// An nkey user (the server knows only the public key; the node signs the server's nonce with
/// the seed file). A `.creds` file needs an operator, account and user JWT signed by them,
/// which this test cannot issue without `nsc`; `credentials_path` is checked for readability.
#[tokio::test]
async fn nats_tls_with_an_nkey() {
    let ca = TestCa::new("nats-nkey");
    let mut servers = Servers::new("nats-nkey");
    let user = nkeys::KeyPair::new_user();
    let port = nats_tls(&mut servers, &ca, &format!("  users: [ {{ nkey: \"{}\" }} ]", user.public_key())).await;
    let seed = servers.write("user.nk", &user.seed().unwrap());
    let config = NatsConfig { nkey_path: seed.display().to_string(), ..nats_config(port, &ca) };
    broadcast_reaches_every_node_and_excludes_the_socket(Broker::NatsWith(Box::new(config))).await;
}

/// A startup that must fail: its name, the variables over the base ones, the key to name.
type Case = (&'static str, Vec<(&'static str, String)>, &'static str);

#[tokio::test]
async fn nats_wrong_password_untrusted_ca_or_unreadable_files_exit_64_naming_the_key() {
    let ca = TestCa::new("nats-bad");
    let other = TestCa::new("nats-other");
    let mut servers = Servers::new("nats-bad");
    let port = nats_tls(&mut servers, &ca, "  user: sockudo\n  password: \"s3cret-nats\"").await;
    let url = format!("tls://127.0.0.1:{port}");
    let (good_ca, bad_ca) = (ca.ca_path().display().to_string(), other.ca_path().display().to_string());
    let cases: [Case; 5] = [
        (
            "wrong password",
            vec![("NATS_PASSWORD", "hunter2".into()), ("NATS_CA_PATH", good_ca.clone())],
            "adapter.nats.servers",
        ),
        (
            "untrusted CA",
            vec![("NATS_PASSWORD", "s3cret-nats".into()), ("NATS_CA_PATH", bad_ca)],
            "adapter.nats.servers",
        ),
        (
            "unreadable CA",
            vec![("NATS_PASSWORD", "hunter2".into()), ("NATS_CA_PATH", "/nonexistent/ca.pem".into())],
            "adapter.nats.ca_path",
        ),
        (
            "unreadable creds",
            vec![
                ("NATS_USERNAME", String::new()),
                ("NATS_CREDENTIALS_PATH", "/nonexistent/u.creds".into()),
                ("NATS_CA_PATH", good_ca.clone()),
            ],
            "adapter.nats.credentials_path",
        ),
        (
            "not an nkey seed",
            vec![
                ("NATS_USERNAME", String::new()),
                ("NATS_NKEY_PATH", ca.ca_path().display().to_string()),
                ("NATS_CA_PATH", good_ca),
            ],
            "adapter.nats.nkey_path",
        ),
    ];
    for (case, extra, key) in cases {
        let mut env = vec![
            ("ADAPTER_DRIVER", "nats".to_owned()),
            ("NATS_SERVERS", url.clone()),
            ("NATS_USERNAME", "sockudo".into()),
        ];
        // A later entry for the same variable wins (Command::env replaces).
        env.extend(extra);
        let (code, err) = run_binary(&env).await;
        assert_eq!(code, Some(64), "{case}: {err}");
        assert!(err.contains(key), "{case}: {err}");
        assert!(!err.contains("hunter2") && !err.contains("s3cret-nats"), "{case}: password leaked: {err}");
    }
    // Two ways to sign in at once is ambiguous: refused before connecting.
    let (code, err) = run_binary(&[
        ("ADAPTER_DRIVER", "nats".into()),
        ("NATS_SERVERS", url.clone()),
        ("NATS_TOKEN", "t".into()),
        ("NATS_NKEY_PATH", "/x".into()),
    ])
    .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("adapter.nats.nkey_path"), "{err}");
}

/// A master, one replica of it and one sentinel watching them as `mymaster`, all plain TCP;
/// returns (master port, replica port, sentinel port) once the sentinel knows the replica.
async fn sentinel_set(servers: &mut Servers) -> (u16, u16, u16) {
    let (master, replica, sentinel) = (free_port(), free_port(), free_port());
    let base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    let m = master.to_string();
    servers.spawn(master, "redis-server", &[&["--port", &m][..], &base].concat()).await;
    let r = replica.to_string();
    servers
        .spawn(replica, "redis-server", &[&["--port", &r, "--replicaof", "127.0.0.1", &m][..], &base].concat())
        .await;
    let conf = servers.write(
        "sentinel.conf",
        &format!(
            "port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
        ),
    );
    servers.spawn(sentinel, "redis-server", &[conf.to_str().unwrap(), "--sentinel"]).await;
    let ready = eventually(Duration::from_secs(20), || async {
        redis_cli(replica, &["INFO", "replication"]).await.contains("master_link_status:up")
            && redis_cli(sentinel, &["SENTINEL", "REPLICAS", "mymaster"]).await.contains(&r)
    })
    .await;
    assert!(ready, "the replica never synced or the sentinel never saw it");
    (master, replica, sentinel)
}

fn sentinel_broker(sentinel: u16) -> Broker {
    Broker::RedisWith(Box::new(RedisConfig {
        sentinels: vec![format!("redis://127.0.0.1:{sentinel}")],
        master_name: "mymaster".into(),
        ..RedisConfig::default()
    }))
}

#[tokio::test]
async fn redis_sentinel_scenarios() {
    let mut servers = Servers::new("sentinel");
    let (_, _, sentinel) = sentinel_set(&mut servers).await;
    scenarios(sentinel_broker(sentinel)).await;
}

/// `SENTINEL FAILOVER` mid-test: the old master becomes a replica and drops our connections;
/// both the publisher and the subscriber of each node ask the sentinel again and move to the
/// new master, without a restart, and delivery across nodes resumes.
#[tokio::test]
async fn redis_sentinel_failover_is_followed() {
    let mut servers = Servers::new("failover");
    let (master, replica, sentinel) = sentinel_set(&mut servers).await;
    let nodes = sentinel_broker(sentinel).cluster(2).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    a.subscribe("live").await;
    b.subscribe("live").await;
    nodes[0].publish("live", "before", "1").await;
    assert_eq!(b.expect("before").await["data"], "1");

    assert_eq!(redis_cli(sentinel, &["SENTINEL", "FAILOVER", "mymaster"]).await, "OK");
    let switched = eventually(Duration::from_secs(30), || async {
        redis_cli(sentinel, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]).await.contains(&replica.to_string())
            && redis_cli(replica, &["ROLE"]).await.starts_with("master")
    })
    .await;
    assert!(switched, "the sentinel never promoted the replica");
    // The nodes move to the new master (within a lookup period): it carries their
    // subscriptions, the old one none.
    let channels = |port: u16| async move { redis_cli(port, &["PUBSUB", "CHANNELS", "*#cluster"]).await };
    let moved = eventually(Duration::from_secs(15), || async {
        !channels(replica).await.is_empty() && channels(master).await.is_empty()
    })
    .await;
    assert!(moved, "subscriptions did not move: new {:?}, old {:?}", channels(replica).await, channels(master).await);
    // Both directions, from each node: retrying, as the first envelopes may race the moves.
    for (from, to) in [(0, 1), (1, 0)] {
        let client = if to == 1 { &mut b } else { &mut a };
        let mut resumed = false;
        for i in 0..100 {
            nodes[from].publish("live", "after", &i.to_string()).await;
            if let Ok(f) = tokio::time::timeout(Duration::from_millis(200), client.expect("after")).await {
                assert_eq!(f["event"], "after");
                resumed = true;
                break;
            }
        }
        assert!(resumed, "delivery from node {from} to node {to} did not resume after the failover");
    }
    stop_all(nodes).await;
}

/// Three masters (no replicas) in a Redis Cluster, each with its own folder and bus port;
/// returns their ports once every node reports `cluster_state:ok`. A free port can be taken by
/// another test between `free_port` and the server's bind (six per attempt here), which shows as
/// a failed `--cluster create`: then it starts over on new ports, three times at most.
async fn redis_cluster(servers: &mut Servers) -> Vec<u16> {
    let mut failures = Vec::new();
    for attempt in 0..3 {
        match try_redis_cluster(servers, attempt).await {
            Ok(ports) => return ports,
            Err(e) => failures.push(e),
        }
    }
    panic!("no Redis Cluster in three attempts: {failures:#?}");
}

async fn try_redis_cluster(servers: &mut Servers, attempt: usize) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (i, port) in ports.iter().enumerate() {
        let (p, bus) = (port.to_string(), free_port().to_string());
        let conf = format!("nodes-{attempt}-{i}.conf");
        let args = [
            "--port",
            &p,
            "--cluster-port",
            &bus,
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &conf,
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        servers.spawn(*port, "redis-server", &args).await;
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut create = tokio::process::Command::new("redis-cli");
    create.arg("--cluster").arg("create").args(&addrs).arg("--cluster-yes");
    let out = tokio::time::timeout(Duration::from_secs(30), create.output()).await.unwrap().unwrap();
    if !out.status.success() {
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        return Err(format!("redis-cli --cluster create on {addrs:?} failed: {said}"));
    }
    for port in &ports {
        let ok = eventually(Duration::from_secs(20), || async {
            redis_cli(*port, &["CLUSTER", "INFO"]).await.contains("cluster_state:ok")
        })
        .await;
        if !ok {
            return Err(format!("node {port} never reached cluster_state:ok"));
        }
    }
    Ok(ports)
}

#[tokio::test]
async fn redis_cluster_scenarios_on_sharded_pubsub() {
    let mut servers = Servers::new("cluster");
    let ports = redis_cluster(&mut servers).await;
    let broker = Broker::RedisWith(Box::new(RedisConfig {
        cluster_nodes: ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect(),
        ..RedisConfig::default()
    }));
    scenarios(broker.clone()).await;
    // Sharded: each node's topic is a shard channel on the one master owning its slot, and no
    // plain channel exists anywhere (plain PUBLISH would be copied to every node).
    let nodes = broker.cluster_with(2, |c| c.rate_limits.driver = "redis".into()).await;
    assert_eq!(nodes[0].publish("limited", "e", "1").await.0, 200);
    let mut owners = 0;
    for port in &ports {
        assert_eq!(redis_cli(*port, &["PUBSUB", "CHANNELS", "*"]).await, "", "a plain channel on {port}");
        if !redis_cli(*port, &["PUBSUB", "SHARDCHANNELS", "*#cluster"]).await.is_empty() {
            owners += 1;
        }
    }
    assert_eq!(owners, 1, "the topic's shard channel lives on exactly one master");
    stop_all(nodes).await;
}
