//! A private certificate authority made by the test with `openssl`: a CA, then server (and
//! client) certificates it signs for `localhost` and `127.0.0.1`, as PEM files in a fresh
//! folder. TLS tests of the listener, Redis, NATS and webhook receivers all trust only it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    pub dir: PathBuf,
}

/// A certificate (with its chain: leaf then CA) and its key, as files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    /// A new CA (`CN=<name> test CA`, EC P-256) in its own temporary folder.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sockudo-ca-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        openssl(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-sha256",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-out",
                "ca.pem",
            ],
        );
        Self { dir }
    }

    /// The CA certificate, to trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_path()).unwrap()
    }

    /// A server certificate for `localhost` and `127.0.0.1` named `name` (`name.pem` holds the
    /// leaf then the CA, `name.key` the PKCS#8 key). Usable as a client certificate too.
    pub fn issue(&self, name: &str) -> Issued {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let leaf = format!("{name}.leaf.pem");
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&self.dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key]);
        openssl(&self.dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr]);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &leaf,
            ],
        );
        let chain = std::fs::read_to_string(self.dir.join(&leaf)).unwrap() + &self.ca_pem();
        let cert = self.dir.join(format!("{name}.pem"));
        std::fs::write(&cert, chain).unwrap();
        Issued { cert, key: self.dir.join(key) }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
