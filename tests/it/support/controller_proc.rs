//! The real `imagemirror controller` binary as a child process, with its admin port, for tests
//! that run several replicas and stop them with signals.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running controller process; killed when dropped.
pub struct ControllerProc {
    /// The `--identity` it runs with.
    pub identity: String,
    /// Its admin server port (`/metrics`).
    pub port: u16,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ControllerProc {
    /// Starts `imagemirror controller` against `kubeconfig` with `identity` and `args`; logs
    /// go to `<log_dir>/<identity>.log`.
    pub fn start(kubeconfig: &Path, log_dir: &Path, identity: &str, args: &[&str]) -> Self {
        let port = free_port();
        let log = std::fs::File::create(log_dir.join(format!("{identity}.log"))).unwrap();
        let bin = std::env::var("IMAGEMIRROR_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_imagemirror").into());
        let child = Command::new(bin)
            .arg("controller")
            .args(["--identity", identity])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("IMAGEMIRROR_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the controller");
        ControllerProc {
            identity: identity.to_string(),
            port,
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// Waits for the exit, at most `limit`; `None` if still running.
    pub async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The value of an unlabelled gauge on `/metrics`, if the server answers.
    pub async fn gauge(&self, name: &str) -> Option<i64> {
        let text = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
