//! What a hostile pod does, as workloads run inside lab pods (`sluice-lab app storm|repeat|
//! spoof`), and the victim's side that checks it was not hurt. Each loop is bounded in count and
//! in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::WAIT;
use crate::app::{Placement, ProcessGuard, binary, command_in, raise_nofile, spawn_held};

/// A connect storm: tries `count` connections to `to`, keeps those that opened (each got the
/// server's greeting), prints `{"opened": N, "refused": M}` and holds them until stdin closes.
pub fn storm(to: SocketAddr, count: usize) -> Result<()> {
    raise_nofile();
    let mut held = Vec::new();
    let mut refused = 0usize;
    for _ in 0..count {
        let opened = TcpStream::connect_timeout(&to, WAIT).and_then(|s| {
            s.set_read_timeout(Some(WAIT))?;
            let mut reader = BufReader::new(s);
            let mut greeting = String::new();
            reader.read_line(&mut greeting)?;
            Ok(reader)
        });
        match opened {
            Ok(reader) => held.push(reader),
            Err(_) => refused += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({ "opened": held.len(), "refused": refused })
    );
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

/// What a storm achieved.
#[derive(Debug, Deserialize)]
pub struct StormOutcome {
    pub opened: usize,
    pub refused: usize,
}

/// Starts a storm of `count` connections from `place`; returns once every attempt is done, with
/// the connections that opened held until the guard is dropped.
pub fn start_storm(
    place: &Placement,
    to: SocketAddr,
    count: usize,
) -> Result<(ProcessGuard, StormOutcome)> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args([
        "app",
        "storm",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let (guard, line) = spawn_held(cmd, "app storm")?;
    let outcome =
        serde_json::from_str(line.trim()).with_context(|| format!("the storm printed {line:?}"))?;
    Ok((guard, outcome))
}

/// Short echo connections to `to` for `seconds` (at most `max`): connect, greeting, 64 bytes
/// echoed, closed with a reset so the port is free again at once. Prints
/// `{"ok": N, "failed": M, "errors": [...]}` (the first few errors).
pub fn repeat(to: SocketAddr, seconds: f64, max: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    while Instant::now() < deadline && ok + failed < max {
        match one_exchange(to) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    serde_json::json!({ "ok": ok, "failed": failed, "errors": errors })
}

fn one_exchange(to: SocketAddr) -> Result<()> {
    let stream = TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting).context("greeting")?;
    if !greeting.starts_with("peer=") {
        bail!("unexpected greeting {greeting:?}");
    }
    let data: Vec<u8> = (0..64u8).collect();
    (&stream).write_all(&data)?;
    let mut back = vec![0u8; data.len()];
    reader.read_exact(&mut back).context("echo")?;
    if back != data {
        bail!("the echo came back corrupted");
    }
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// What the victim's loop saw.
#[derive(Debug, Deserialize)]
pub struct RepeatOutcome {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

/// Starts the victim's loop in `place`; [`Running::finish`] waits for its outcome.
pub fn start_repeat(place: &Placement, to: SocketAddr, seconds: f64) -> Result<Running> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args([
        "app",
        "repeat",
        "--to",
        &to.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    Running::start(cmd, "app repeat")
}

/// Hostile: from `from` (another pod's address, bound with `IP_TRANSPARENT`, which needs only
/// `CAP_NET_RAW`), on each of `ports` ports from `first_port`, in a loop for `seconds`: connect
/// to `to` and close. Under capture each such connect is redirected into the attacker's own
/// proxy listener, and its sockops run tries to file `to` as the original destination of
/// (`from`, port): the victim's key. `pause` between attempts keeps a loop whose every connect
/// reaches the shared proxy from starving the victim of CPU on a slow (emulated) machine.
/// Prints `{"attempts": N, "errors": M}`.
pub fn spoof(
    from: IpAddr,
    first_port: u16,
    ports: u16,
    to: SocketAddr,
    seconds: f64,
    pause: Duration,
) -> String {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut attempts, mut errors) = (0u64, 0u64);
    // At most a million attempts, whatever the clock says.
    'outer: for _ in 0..(1_000_000 / u64::from(ports.max(1))).max(1) {
        for port in first_port..first_port.saturating_add(ports) {
            if Instant::now() >= deadline {
                break 'outer;
            }
            attempts += 1;
            if spoofed_connect(SocketAddr::new(from, port), to).is_err() {
                errors += 1;
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
    serde_json::json!({ "attempts": attempts, "errors": errors }).to_string()
}

fn spoofed_connect(from: SocketAddr, to: SocketAddr) -> std::io::Result<()> {
    let socket = transparent_socket(from, to)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // Let the SYN go (the sockops run happens in connect itself), then abort.
    let _ = socket.set_linger(Some(Duration::ZERO));
    Ok(())
}

/// What the attacker's loop did.
#[derive(Debug, Deserialize)]
pub struct SpoofOutcome {
    pub attempts: u64,
    pub errors: u64,
}

/// Starts the attacker's loop in `place`; [`Running::finish`] waits for its outcome.
pub fn start_spoof(
    place: &Placement,
    from: IpAddr,
    first_port: u16,
    ports: u16,
    to: SocketAddr,
    seconds: f64,
    pause: Duration,
) -> Result<Running> {
    let mut cmd = command_in(&binary()?, place)?;
    cmd.args([
        "app",
        "spoof",
        "--pause-us",
        &pause.as_micros().to_string(),
        "--from",
        &from.to_string(),
        "--first-port",
        &first_port.to_string(),
        "--ports",
        &ports.to_string(),
        "--to",
        &to.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]);
    Running::start(cmd, "app spoof")
}

/// A workload that prints one JSON line when it is done.
pub struct Running {
    guard: ProcessGuard,
}

impl Running {
    fn start(mut cmd: std::process::Command, name: &str) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        Ok(Self {
            guard: ProcessGuard {
                child,
                name: name.to_owned(),
            },
        })
    }

    /// Waits (bounded by `limit`) for the JSON line and parses it.
    pub fn finish<T: serde::de::DeserializeOwned>(mut self, limit: Duration) -> Result<T> {
        let stdout = self.guard.child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(limit)
            .with_context(|| format!("{} did not finish within {limit:?}", self.guard.name))?;
        serde_json::from_str(line.trim())
            .with_context(|| format!("{} printed {line:?}", self.guard.name))
    }
}

/// How long a forged connection may take to complete before it counts as failed: a blind
/// spoofer never sees the SYN-ACK, so this is how long the attacker waits in vain.
const FORGE_WAIT: Duration = Duration::from_secs(2);

/// Hostile, run by `sluice-lab app forge`: one connection to `to` from a source address the
/// pod does not own (`IP_TRANSPARENT`, e.g. the node's probe address or the node's own), trying
/// to complete the handshake and read the app's greeting; prints one JSON [`Outcome`].
pub fn forge(from: IpAddr, to: SocketAddr) -> crate::app::Outcome {
    let attempt = || -> Result<crate::app::Outcome> {
        let socket = transparent_socket(SocketAddr::new(from, 0), to)?;
        socket.connect_timeout(&SockAddr::from(to), FORGE_WAIT)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(FORGE_WAIT))?;
        let mut greeting = String::new();
        BufReader::new(&stream)
            .read_line(&mut greeting)
            .context("read the app's greeting")?;
        Ok(crate::app::Outcome {
            ok: greeting.starts_with("peer="),
            error: None,
            peer: stream.peer_addr().ok().map(|a| a.to_string()),
            local: stream.local_addr().ok().map(|a| a.to_string()),
            server_saw: greeting.trim().strip_prefix("peer=").map(str::to_owned),
            echoed: 0,
        })
    };
    attempt().unwrap_or_else(|e| crate::app::Outcome {
        ok: false,
        error: Some(format!("{e:#}")),
        ..Default::default()
    })
}

/// Runs [`forge`] inside `place` (a hostile pod).
pub fn run_forged_client(
    place: &Placement,
    from: IpAddr,
    to: SocketAddr,
) -> Result<crate::app::Outcome> {
    let out = command_in(&binary()?, place)?
        .args([
            "app",
            "forge",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("run the forging client")?;
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("forging client printed {line:?}"))
}

fn transparent_socket(from: SocketAddr, to: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    let (level, name) = if from.is_ipv4() {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the size given.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(from))?;
    Ok(socket)
}
