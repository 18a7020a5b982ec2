//! The control plane's router as it really is: Go's `net/http` ServeMux, which routes on the
//! percent-decoded path (`tests/upstream_go/main.go`), built with the machine's `go` and run
//! on 127.0.0.1. Every handler echoes what it saw; `/counts` on a second port says how many
//! requests and login guesses reached each handler.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use super::{get, request, Response};

/// The running Go upstream, killed on drop.
pub struct GoUpstream {
    child: Child,
    /// Where the routed API listens.
    pub addr: SocketAddr,
    /// Where `/counts` listens.
    pub stats: SocketAddr,
}

/// Builds the Go upstream once per test binary (into the target's temp dir).
fn binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upstream_go/main.go");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("upstream_go");
        // Test binaries build in parallel: each writes its own file, then renames it in place.
        let tmp = dir.join(format!("upstream_go.{}", std::process::id()));
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&tmp)
            .arg(src)
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .status()
            .expect("`go` (scripts/setup.sh installs golang-go)");
        assert!(status.success(), "go build {src} failed");
        std::fs::rename(&tmp, &out).expect("move the Go upstream in place");
        out
    })
}

impl GoUpstream {
    /// Starts a fresh Go upstream.
    pub fn start() -> GoUpstream {
        let mut child = Command::new(binary())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Go upstream");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the Go upstream's address");
        let mut words = line.split_whitespace().skip(1);
        let addr = words
            .next()
            .and_then(|a| a.parse().ok())
            .expect("api address");
        let stats = words
            .next()
            .and_then(|a| a.parse().ok())
            .expect("stats address");
        GoUpstream { child, addr, stats }
    }

    /// How many requests (`handler:<name>`) and login guesses (`guess:<domain>/<email>`,
    /// `guess:*/<email>`) reached the upstream so far.
    pub fn counts(&self) -> HashMap<String, u64> {
        let r = request(self.stats, &get("/counts"));
        serde_json::from_slice(&r.body).expect("counts as JSON")
    }

    /// One count (0 when absent).
    pub fn count(&self, key: &str) -> u64 {
        self.counts().get(key).copied().unwrap_or(0)
    }
}

impl Drop for GoUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a handler of the Go upstream saw, from its echo.
#[derive(Debug, serde::Deserialize)]
pub struct Seen {
    pub handler: String,
    pub method: String,
    pub path: String,
    pub target: String,
    pub query: HashMap<String, Vec<String>>,
    pub headers: HashMap<String, Vec<String>>,
    pub host: String,
}

impl Seen {
    /// The echo in `r`, when the request reached a handler that echoes.
    pub fn of(r: &Response) -> Option<Seen> {
        (r.status == 200)
            .then(|| serde_json::from_slice(&r.body).ok())
            .flatten()
    }

    /// Every header the upstream got whose name reads as `name` to a CGI/WSGI server (case
    /// and `_` versus `-` ignored), with its values.
    pub fn cgi_header(&self, name: &str) -> Vec<(String, Vec<String>)> {
        let fold = |s: &str| s.to_ascii_lowercase().replace('_', "-");
        self.headers
            .iter()
            .filter(|(k, _)| fold(k) == fold(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
