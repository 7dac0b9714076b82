//! Private instances of the real servers, for the tests that kill, pause,
//! stop or wipe one: each test gets its own process on its own port and data
//! directory, so the fault hits nobody else. They use the binaries
//! `scripts/stack up` installed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory for one instance's data, removed on drop.
fn scratch_dir(kind: &str) -> PathBuf {
    // Under /var/tmp, which the `postgres` user can reach when we run as root.
    let dir = PathBuf::from("/var/tmp").join(crate::unique(&format!("firstcome-test-{kind}-")));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn need(binary: &Path) -> &Path {
    assert!(
        binary.exists(),
        "{} is missing: run `scripts/stack up`, which installs it",
        binary.display()
    );
    binary
}

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Sends `signal` (e.g. `STOP`, `CONT`, `TERM`) to a process.
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// A Redis server of its own, with AOF like the local stack.
pub struct PrivateRedis {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts it.
    pub async fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
        };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs; `scripts/stack up` installs it");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis", || port_open(port)).await;
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `kill -9`, then deletes everything it stored, then starts it again on
    /// the same port: a Redis that lost all its data.
    pub async fn restart_wiped(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir_all(&self.dir).unwrap();
        self.run().await;
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nisshi broker binary `scripts/stack up` installed.
fn nisshi() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v nisshi"])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    home.join("bin/nisshi")
}

/// A Kafka broker (nisshi) of its own, storing in SQLite so it keeps its
/// log across a `kill -9`.
pub struct PrivateBroker {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts it.
    pub async fn start() -> Self {
        let mut b = Self {
            port: free_port(),
            dir: scratch_dir("kafka"),
            child: None,
        };
        b.run().await;
        b
    }

    async fn run(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join("nisshi.log")).unwrap();
        let child = Command::new(need(&nisshi()))
            .current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the nisshi broker runs");
        self.child = Some(child);
        let port = self.port;
        wait_until("the broker", || port_open(port)).await;
    }

    /// Its bootstrap address.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`Self::kill`], with the data it had.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.run().await;
    }

    /// `SIGSTOP`: the process is frozen, its connections stay open and silent.
    pub fn freeze(&self) {
        signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// `SIGCONT` after [`Self::freeze`].
    pub fn thaw(&self) {
        signal(self.child.as_ref().expect("running").id(), "CONT");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory of the Postgres server binaries.
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("pg_ctl").exists())
        .expect("Postgres is not installed: run `scripts/stack up`, which installs it")
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a Postgres tool as the `postgres` user when we are root (Postgres
/// refuses to run as root).
fn pg_tool(tool: &str) -> Command {
    let path = pg_bin().join(tool);
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A Postgres server of its own.
pub struct PrivatePostgres {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
}

impl PrivatePostgres {
    /// Creates a cluster and starts it.
    pub async fn start() -> Self {
        let pg = Self {
            port: free_port(),
            dir: scratch_dir("pg"),
        };
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the Postgres directory");
        }
        let out = pg_tool("initdb")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C.UTF-8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server().await;
        pg
    }

    /// Starts the server (after [`Self::stop`]).
    pub async fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (`pg_ctl stop -m immediate`: every connection is cut
    /// at once, as in a crash).
    pub fn stop(&self) {
        let _ = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
