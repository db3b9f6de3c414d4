//! A real CNCF distribution registry (`docker-registry`) on 127.0.0.1 with an ephemeral port and
//! its own storage, stopped on drop. Plain HTTP by default; HTTPS with a test CA's certificate
//! when asked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tls::{ServerCert, client_config};
use super::token::TokenAuth;

/// A running registry.
pub struct TestRegistry {
    child: Child,
    host: String,
    /// Set when the registry serves HTTPS: a client config trusting its CA.
    tls: Option<Arc<rustls::ClientConfig>>,
    _dir: tempfile::TempDir,
}

/// One line of the access log.
#[derive(Clone, Debug)]
pub struct Answered {
    /// `METHOD /path?query`.
    pub request: String,
    /// The request's protocol as the registry saw it: `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
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
    /// `auth: token`: clients get bearer tokens from this token server.
    pub token: Option<TokenAuth>,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub tls: Option<ServerCert>,
    /// Refuse deletes (405 UNSUPPORTED), distribution's default; the harness enables them
    /// otherwise.
    pub deletes_disabled: bool,
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
        if let Some(token) = &config.token {
            let bundle = dir.path().join("token-roots.pem");
            std::fs::write(&bundle, &token.root_cert_pem).map_err(|e| e.to_string())?;
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token.realm,
                token.service,
                token.issuer,
                bundle.display()
            );
        }
        let mut tls = String::new();
        if let Some(cert) = &config.tls {
            let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            std::fs::write(&c, &cert.cert_pem).map_err(|e| e.to_string())?;
            std::fs::write(&k, &cert.key_pem).map_err(|e| e.to_string())?;
            tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            );
        }
        let config_text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {host}\n  secret: imagemirror-test-secret\n{tls}{auth}",
            dir.path().join("data").display(),
            !config.deletes_disabled
        );
        let tls = config.tls.as_ref().map(|c| client_config(&c.ca_pem));
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
            // Over TLS this is a full handshake verified against the test CA, so a registry
            // that is up but serves the wrong certificate never counts as ready.
            if let Some(answer) = http_get(&host, "/v2/", tls.as_ref())
                && (answer.starts_with(b"HTTP/1.1 200") || answer.starts_with(b"HTTP/1.1 401"))
            {
                return Ok(TestRegistry {
                    child,
                    host,
                    tls,
                    _dir: dir,
                });
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

    /// `https://127.0.0.1:port` when serving TLS, else `http://127.0.0.1:port`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    /// Runs `docker-registry garbage-collect` on this registry's storage (the registry keeps
    /// serving; it has no blob cache configured, so it sees the result at once). Returns the
    /// tool's output; panics when it fails.
    pub fn garbage_collect(&self) -> String {
        let out = Command::new(binary())
            .arg("garbage-collect")
            .arg(self._dir.path().join("config.yml"))
            .output()
            .expect("run docker-registry garbage-collect");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "garbage-collect failed: {text}");
        text
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
        let _ = http_get(&self.host, &sentinel, self.tls.as_ref());
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
                        let (request, protocol) = parts.nth(1)?.rsplit_once(' ')?;
                        let (request, protocol) = (request.to_string(), protocol.to_string());
                        let mut after = parts.next()?.split_whitespace();
                        let status = after.next()?.parse().ok()?;
                        let bytes = after.next()?.parse().unwrap_or(0);
                        Some(Answered {
                            request,
                            protocol,
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

/// `GET path` with `Connection: close`; the raw answer (status line first), or `None` when the
/// connection or the TLS handshake fails. Blocking, with short timeouts: harness probes only.
fn http_get(host: &str, path: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<Vec<u8>> {
    let mut tcp = TcpStream::connect(host).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let result = match tls {
        None => tcp
            .write_all(req.as_bytes())
            .and_then(|_| tcp.read_to_end(&mut answer)),
        Some(config) => {
            let ip = host.rsplit_once(':').map_or(host, |(ip, _)| ip).to_string();
            let name = rustls::pki_types::ServerName::try_from(ip).ok()?;
            let conn = rustls::ClientConnection::new(config.clone(), name).ok()?;
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            stream
                .write_all(req.as_bytes())
                .and_then(|_| stream.read_to_end(&mut answer))
        }
    };
    // A server that closes without TLS close_notify (or a timeout after the answer arrived)
    // still answered: what was read counts.
    match result {
        Ok(_) => Some(answer),
        Err(_) if !answer.is_empty() => Some(answer),
        Err(_) => None,
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
