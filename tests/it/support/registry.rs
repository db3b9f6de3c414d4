//! A real CNCF distribution registry (`docker-registry`) on 127.0.0.1 with an ephemeral port and
//! its own storage, stopped on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running registry.
pub struct TestRegistry {
    child: Child,
    host: String,
    _dir: tempfile::TempDir,
}

/// One line of the access log.
#[derive(Clone, Debug)]
pub struct Answered {
    /// `METHOD /path?query`.
    pub request: String,
    /// The HTTP status.
    pub status: u16,
    /// Response body bytes.
    pub bytes: u64,
}

/// Optional settings.
#[derive(Default, Clone)]
pub struct RegistryConfig {
    /// htpasswd basic auth with this user and password.
    pub htpasswd: Option<(String, String)>,
}

fn binary() -> PathBuf {
    std::env::var_os("IMAGEMIRROR_TEST_REGISTRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> Self {
        Self::start_with(RegistryConfig::default())
    }

    /// A registry with the given settings. Panics (test harness) when it cannot start.
    pub fn start_with(config: RegistryConfig) -> Self {
        let mut last_err = String::new();
        // The port is free when picked but may be taken before the registry binds it: retry.
        for _ in 0..5 {
            match Self::try_start(&config) {
                Ok(r) => return r,
                Err(e) => last_err = e,
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn try_start(config: &RegistryConfig) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((user, pass)) = &config.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .map_err(|e| format!("htpasswd (apache2-utils) not runnable: {e}"))?;
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).map_err(|e| e.to_string())?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                path.display()
            );
        }
        let config_text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {host}\n  secret: imagemirror-test-secret\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config_text).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let access =
            std::fs::File::create(dir.path().join("access.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(binary())
            .arg("serve")
            .arg(&config_path)
            .stdout(access)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e} (run scripts/install-deps.sh)", binary().display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
                return Err(format!("exited with {status}: {log}"));
            }
            if let Ok(mut s) = std::net::TcpStream::connect(&host) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 32];
                if s.write_all(req.as_bytes()).is_ok()
                    && s.read(&mut buf).is_ok_and(|n| n >= 12)
                    && (buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.1 401"))
                {
                    return Ok(TestRegistry {
                        child,
                        host,
                        _dir: dir,
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("no answer on /v2/ within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:port`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Every request the registry has answered, as `METHOD /path?query`, from its access log.
    /// A sentinel request is sent and awaited first, so everything answered before the call is
    /// in the list.
    pub fn requests(&self) -> Vec<String> {
        self.responses().into_iter().map(|r| r.request).collect()
    }

    /// Every request the registry has answered, with its status and the bytes it sent back.
    pub fn responses(&self) -> Vec<Answered> {
        let sentinel = format!("/v2/?sentinel={}", rand::random::<u64>());
        if let Ok(mut s) = std::net::TcpStream::connect(&self.host) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!(
                "GET {sentinel} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.host
            );
            let mut sink = Vec::new();
            let _ = s
                .write_all(req.as_bytes())
                .and_then(|_| s.read_to_end(&mut sink));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log =
                std::fs::read_to_string(self._dir.path().join("access.log")).unwrap_or_default();
            if log.contains(&sentinel) || Instant::now() > deadline {
                // `host - - [date] "METHOD /path HTTP/1.1" status bytes "referer" "agent"`
                return log
                    .lines()
                    .filter_map(|l| {
                        let mut parts = l.split('"');
                        let request = parts.nth(1)?.rsplit_once(' ')?.0.to_string();
                        let mut after = parts.next()?.split_whitespace();
                        let status = after.next()?.parse().ok()?;
                        let bytes = after.next()?.parse().unwrap_or(0);
                        Some(Answered {
                            request,
                            status,
                            bytes,
                        })
                    })
                    .filter(|r| !r.request.contains("sentinel="))
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
