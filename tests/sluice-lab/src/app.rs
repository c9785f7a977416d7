//! The workloads in a lab: a small echo server and client run as separate processes inside a
//! pod (its netns, and for clients its cgroup, which is what outbound capture keys on).
//!
//! Wire protocol: on accept the server writes `peer=<addr>\n` (what it saw as the client's
//! address), then echoes every byte until EOF. The client reports, as one JSON line, the peer
//! and local address its own socket shows and what the server saw.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::WAIT;

static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Tells the lab which `sluice-lab` binary runs the apps (tests pass `CARGO_BIN_EXE_sluice-lab`;
/// the lab binary itself defaults to its own path).
pub fn set_binary(path: impl Into<PathBuf>) {
    let _ = BINARY.set(path.into());
}

pub fn binary() -> Result<PathBuf> {
    if let Some(path) = BINARY.get() {
        return Ok(path.clone());
    }
    std::env::current_exe().context("find the sluice-lab binary")
}

/// A binary built next to the lab binary (same cargo profile), e.g. `sluice-proxy`.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let lab = binary()?;
    let dir = lab.parent().context("the lab binary has no parent dir")?;
    // Integration tests run from target/<profile>/deps; binaries sit one level up.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        lab.display()
    )
}

/// Where a lab process runs.
#[derive(Clone, Debug)]
pub struct Placement {
    pub netns: PathBuf,
    /// Join this cgroup before exec (clients in a captured pod).
    pub cgroup: Option<PathBuf>,
}

/// A child process, killed and reaped on drop.
pub struct ProcessGuard {
    pub child: Child,
    pub name: String,
}

impl ProcessGuard {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builds a command that enters `place` (cgroup first: `ip netns exec`-style remounts would
/// hide the cgroup fs, and a socket's cgroup is fixed when it is created) before exec.
pub fn command_in(program: &Path, place: &Placement) -> Result<Command> {
    let netns: OwnedFd = std::fs::File::open(&place.netns)
        .with_context(|| format!("open netns {}", place.netns.display()))?
        .into();
    let procs = place
        .cgroup
        .as_ref()
        .map(|c| CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes()))
        .transpose()?;
    let mut cmd = Command::new(program);
    // Its own process group: a Ctrl-C at the terminal reaches the lab only, which then stops
    // its processes in order and removes what it created.
    cmd.process_group(0);
    // SAFETY: between fork and exec the closure calls only open/write/close/setns, which are
    // async-signal-safe, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A command that joins `cgroup` before exec and stays in the caller's netns (the lab's agent,
/// which runs in its node's cgroup but serves its health port on the host's loopback).
pub fn command_in_cgroup(program: &Path, cgroup: &Path) -> Result<Command> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec the closure calls only open/write/close, which are
    // async-signal-safe, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Starts an HTTP server (every request answered `200` with body `peer=<client>`) on `addrs`
/// inside `place`, the app behind an HTTP probe; returns once it is listening.
pub fn spawn_http_server(place: &Placement, addrs: &[SocketAddr]) -> Result<ProcessGuard> {
    spawn_listening(place, addrs, "http-serve")
}

/// Starts an echo server listening on `addrs` inside `place`; returns once it is listening.
pub fn spawn_server(place: &Placement, addrs: &[SocketAddr]) -> Result<ProcessGuard> {
    spawn_listening(place, addrs, "serve")
}

fn spawn_listening(place: &Placement, addrs: &[SocketAddr], mode: &str) -> Result<ProcessGuard> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.arg("app").arg(mode);
    for addr in addrs {
        cmd.arg("--listen").arg(addr.to_string());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn the {mode} server"))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut guard = ProcessGuard {
        child,
        name: format!("server {addrs:?}"),
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "listening" {
        guard.kill();
        bail!("{mode} server on {addrs:?} did not start (said {line:?})");
    }
    Ok(guard)
}

/// What a client saw. `ok == false` carries the error (refused, timed out, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    /// The client socket's `getpeername()`.
    pub peer: Option<String>,
    /// The client socket's `getsockname()`.
    pub local: Option<String>,
    /// The client address the server saw.
    pub server_saw: Option<String>,
    pub echoed: u64,
}

/// Runs one client connection to `to` inside `place` and reports what it saw.
pub fn run_client(place: &Placement, to: SocketAddr, bytes: u64) -> Result<Outcome> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args([
        "app",
        "connect",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("run the client")?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("client printed {line:?}"))
}

/// What an HTTP probe saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct HttpOutcome {
    pub ok: bool,
    pub error: Option<String>,
    pub status: Option<u16>,
    /// The client address the server saw (its response body).
    pub server_saw: Option<String>,
}

/// One HTTP GET to `to` from inside `place`, as kubelet's HTTP probe sends it.
pub fn run_http_get(place: &Placement, to: SocketAddr) -> Result<HttpOutcome> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args(["app", "http-get", "--to", &to.to_string()]);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("run the HTTP client")?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("HTTP client printed {line:?}"))
}

/// HTTP server side, run by `sluice-lab app http-serve`: one request per connection.
pub fn http_serve(addrs: &[SocketAddr]) -> Result<()> {
    serve_each(addrs, answer_http)
}

fn answer_http(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(WAIT))?;
    let peer = stream.peer_addr()?;
    // Read the request head (bounded: 8 KiB), then answer and close.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = format!("peer={peer}");
    stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    stream.shutdown(Shutdown::Write)
}

/// HTTP client side, run by `sluice-lab app http-get`: prints one JSON [`HttpOutcome`].
pub fn http_get(to: SocketAddr) -> HttpOutcome {
    let attempt = || -> Result<HttpOutcome> {
        let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.write_all(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: {to}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let mut response = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut response)
            .context("read the response")?;
        let response = String::from_utf8_lossy(&response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status line in {response:?}"))?;
        let server_saw = response
            .split_once("\r\n\r\n")
            .and_then(|(_, body)| body.strip_prefix("peer="))
            .map(str::to_owned);
        Ok(HttpOutcome {
            ok: status == 200,
            error: None,
            status: Some(status),
            server_saw,
        })
    };
    attempt().unwrap_or_else(|e| HttpOutcome {
        ok: false,
        error: Some(format!("{e:#}")),
        ..Default::default()
    })
}

/// Server side, run by `sluice-lab app serve`.
pub fn serve(addrs: &[SocketAddr]) -> Result<()> {
    raise_nofile();
    serve_each(addrs, echo)
}

/// Listens on `addrs`, says so on stdout, and runs `handle` on a thread per connection.
fn serve_each(addrs: &[SocketAddr], handle: fn(TcpStream) -> std::io::Result<()>) -> Result<()> {
    let listeners: Vec<TcpListener> = addrs
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<_>>()?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    for listener in listeners {
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = handle(stream);
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.write_all(format!("peer={peer}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Client side, run by `sluice-lab app connect`: prints one JSON [`Outcome`].
pub fn connect(to: SocketAddr, bytes: u64) -> Outcome {
    match try_connect(to, bytes) {
        Ok(outcome) => outcome,
        Err(e) => Outcome {
            ok: false,
            error: Some(format!("{e:#}")),
            ..Default::default()
        },
    }
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn try_connect(to: SocketAddr, bytes: u64) -> Result<Outcome> {
    let stream = TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    let peer = stream.peer_addr()?.to_string();
    let local = stream.local_addr()?.to_string();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .context("read the server's greeting")?;
    let server_saw = greeting
        .trim()
        .strip_prefix("peer=")
        .with_context(|| format!("unexpected greeting {greeting:?}"))?
        .to_owned();
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(64 * 1024);
            let data: Vec<u8> = (sent..sent + n).map(pattern).collect();
            writer.write_all(&data)?;
            sent += n;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut echoed = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).context("read the echo")?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(echoed + i as u64) {
                bail!("echo corrupted at byte {}", echoed + i as u64);
            }
        }
        echoed += n as u64;
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    if echoed != bytes {
        bail!("sent {bytes} bytes, {echoed} came back");
    }
    Ok(Outcome {
        ok: true,
        error: None,
        peer: Some(peer),
        local: Some(local),
        server_saw: Some(server_saw),
        echoed,
    })
}

/// Short-connection rate client, run by `sluice-lab app connrate`: connect, read the greeting,
/// close, as often as possible for `seconds` (bounded by `max` connections too).
pub fn connrate(to: SocketAddr, seconds: f64, max: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut done, mut errors) = (0u64, 0u64);
    let mut buf = [0u8; 128];
    while Instant::now() < deadline && done + errors < max {
        let result = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&to, WAIT)?;
            s.set_read_timeout(Some(WAIT))?;
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        })();
        match result {
            Ok(()) => done += 1,
            Err(_) => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    serde_json::json!({ "connections": done, "errors": errors, "seconds": elapsed, "per_second": done as f64 / elapsed })
}

/// Request/response latency: one connection, `size`-byte messages echoed back one at a time
/// for `seconds`; prints the p50/p99 round trip in microseconds.
pub fn rr(to: SocketAddr, seconds: f64, size: usize) -> Result<serde_json::Value> {
    let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut greeting = [0u8; 1];
    // Skip the server's `peer=...\n` greeting.
    loop {
        stream.read_exact(&mut greeting)?;
        if greeting[0] == b'\n' {
            break;
        }
    }
    let message = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    // Bounded by time and by count.
    while Instant::now() < deadline && samples.len() < 10_000_000 {
        let sent = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    if samples.is_empty() {
        bail!("no round trip completed");
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(serde_json::json!({ "round_trips": samples.len(), "p50_us": at(0.5), "p99_us": at(0.99) }))
}

/// Opens `count` connections to `to` and keeps them open until stdin closes; prints `open N`
/// once all are established (each has received its greeting, so it crossed every proxy).
pub fn hold(to: SocketAddr, count: usize) -> Result<()> {
    raise_nofile();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let stream = TcpStream::connect_timeout(&to, WAIT)
            .with_context(|| format!("connection {i} of {count}"))?;
        stream.set_read_timeout(Some(WAIT))?;
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .with_context(|| format!("greeting on connection {i}"))?;
        held.push(reader);
    }
    println!("open {}", held.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

/// One connection kept open across a test's steps, run by `sluice-lab app session`: prints
/// `open` once connected, then answers each stdin line (a byte count) with one echo round trip
/// and a line `ok` or `error: …`.
pub fn session(to: SocketAddr) -> Result<()> {
    let stream = TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .context("read the greeting")?;
    println!("open");
    std::io::stdout().flush()?;
    let mut writer = stream;
    for line in std::io::stdin().lines() {
        let bytes: u64 = line?.trim().parse().unwrap_or(1024);
        let data: Vec<u8> = (0..bytes).map(pattern).collect();
        let round_trip = writer.write_all(&data).and_then(|()| {
            let mut back = vec![0u8; data.len()];
            reader.read_exact(&mut back)?;
            if back == data {
                Ok(())
            } else {
                Err(std::io::Error::other("the echo came back corrupted"))
            }
        });
        match round_trip {
            Ok(()) => println!("ok"),
            Err(e) => println!("error: {e}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// A running `app session`: one connection the test drives step by step.
pub struct Session {
    guard: ProcessGuard,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Session {
    /// Connects from `place` to `to`; returns once the server's greeting arrived.
    pub fn open(place: &Placement, to: SocketAddr) -> Result<Self> {
        let mut cmd = command_in(&binary()?, place)?;
        cmd.args(["app", "session", "--to", &to.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut guard = ProcessGuard {
            child: cmd.spawn().context("start the session client")?,
            name: "app session".into(),
        };
        let mut stdout = BufReader::new(guard.child.stdout.take().context("session stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "open" {
            bail!("the session to {to} did not open: {line:?}");
        }
        Ok(Self { guard, stdout })
    }

    /// One echo round trip of `bytes` on the same connection.
    pub fn round_trip(&mut self, bytes: u64) -> Result<()> {
        let stdin = self.guard.child.stdin.as_mut().context("session stdin")?;
        writeln!(stdin, "{bytes}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "ok" {
            bail!("round trip of {bytes} bytes on the open connection: {line:?}");
        }
        Ok(())
    }
}

/// Raises this process's open-file limit to its hard limit: a workload holding a thousand
/// connections needs more than the usual 1024.
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Starts `app hold` in `place`: `count` connections to `to`, open once this returns; they
/// close when the guard is dropped (or [`ProcessGuard::kill`]ed).
pub fn hold_connections(place: &Placement, to: SocketAddr, count: usize) -> Result<ProcessGuard> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args([
        "app",
        "hold",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let (guard, line) = spawn_held(cmd, "app hold")?;
    if line.trim() != format!("open {count}") {
        bail!("the holder did not open {count} connections: {line:?}");
    }
    Ok(guard)
}

/// Starts a workload that reports on its first stdout line and then holds what it opened until
/// its stdin closes (the guard's drop): the guard and that line.
pub fn spawn_held(mut cmd: Command, name: &str) -> Result<(ProcessGuard, String)> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut guard = ProcessGuard {
        child: cmd.spawn().with_context(|| format!("start {name}"))?,
        name: name.to_owned(),
    };
    let stdout = guard.child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok((guard, line))
}
