//! The soak benchmark's workloads (`sluice-lab app soak-serve|soak-hold|tls-flood`): an echo
//! server and a holder of thousands of connections, both on tokio so ten thousand connections
//! cost tasks, not threads; and an unauthenticated TLS handshake flood against an HBONE port.
//! Every loop is bounded in count and in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::WAIT;
use crate::app::raise_nofile;

/// The bytes one trickle round trip carries each way.
const TRICKLE: &[u8] = b"soak-trickle-16b";
/// How long a trickle round trip may take before it counts as an error (short, so a holder
/// with dead connections still stops promptly when told).
const TRICKLE_WAIT: Duration = Duration::from_secs(2);
/// Connections opened at once while the holder fills up.
const OPENING_AT_ONCE: usize = 64;

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

/// An echo server as `app serve` (greets with `peer=ADDR`), a task per connection and a small
/// buffer each, for as many connections as the soak holds.
pub fn serve(addrs: &[SocketAddr]) -> Result<()> {
    raise_nofile();
    runtime(2)?.block_on(async {
        let mut accepting = Vec::new();
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?;
            accepting.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else {
                        // EMFILE and the like: wait for room instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    tokio::spawn(echo(stream, peer));
                }
            }));
        }
        println!("listening");
        for task in accepting {
            let _ = task.await;
        }
        Ok(())
    })
}

async fn echo(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream
        .write_all(format!("peer={peer}\n").as_bytes())
        .await?;
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// What a holder did, printed as its last line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HoldOutcome {
    pub opened: u64,
    pub open_errors: u64,
    pub trickles: u64,
    pub trickle_errors: u64,
    pub churned: u64,
    pub churn_errors: u64,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Counters {
    trickles: AtomicU64,
    trickle_errors: AtomicU64,
    churned: AtomicU64,
    churn_errors: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn error(&self, counter: &AtomicU64, e: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 8 {
            errors.push(e.to_string());
        }
    }
}

/// One held connection: the greeting read, then trickle round trips on demand.
async fn open(to: SocketAddr) -> Result<BufReader<TcpStream>> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(to))
        .await
        .context("connect timed out")??;
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    tokio::time::timeout(WAIT, reader.read_line(&mut greeting))
        .await
        .context("no greeting in time")??;
    anyhow::ensure!(greeting.starts_with("peer="), "greeting {greeting:?}");
    Ok(reader)
}

async fn trickle(conn: &mut BufReader<TcpStream>) -> Result<()> {
    conn.get_mut().write_all(TRICKLE).await?;
    let mut back = [0u8; TRICKLE.len()];
    tokio::time::timeout(TRICKLE_WAIT, conn.read_exact(&mut back))
        .await
        .context("no echo in time")??;
    anyhow::ensure!(back == TRICKLE, "the echo came back altered");
    Ok(())
}

/// Opens `count` connections to `to` (each has its greeting, so it crossed every proxy), prints
/// `open N` (N those that opened), then until stdin closes (at most `max_seconds`): every
/// 100 ms a trickle round trip on a few of them in turn (`trickle_per_s` in all) and
/// `churn_per_s` closed and opened anew. Prints a [`HoldOutcome`] as its last line.
pub fn hold(
    to: SocketAddr,
    count: usize,
    trickle_per_s: u32,
    churn_per_s: u32,
    max_seconds: u64,
) -> Result<()> {
    raise_nofile();
    runtime(1)?.block_on(async move {
        let counters = Arc::new(Counters::default());
        let mut outcome = HoldOutcome::default();
        let mut held = Vec::with_capacity(count);
        let mut opening = tokio::task::JoinSet::new();
        let mut started = 0;
        while held.len() + (outcome.open_errors as usize) < count {
            while started < count && opening.len() < OPENING_AT_ONCE {
                opening.spawn(open(to));
                started += 1;
            }
            match opening.join_next().await {
                Some(Ok(Ok(conn))) => held.push(conn),
                Some(Ok(Err(e))) => {
                    outcome.open_errors += 1;
                    if outcome.errors.len() < 8 {
                        outcome.errors.push(format!("open: {e:#}"));
                    }
                }
                Some(Err(e)) => anyhow::bail!("an opening task failed: {e}"),
                None => break,
            }
        }
        outcome.opened = held.len() as u64;
        println!("open {}", held.len());
        use std::io::Write as _;
        std::io::stdout().flush()?;

        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
            let _ = stop_tx.send(());
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(max_seconds);
        let per_tick = |per_s: u32| (per_s as usize).div_ceil(10);
        let mut next = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep_until(until) => break,
                _ = tick.tick() => {}
            }
            if held.is_empty() {
                continue;
            }
            for _ in 0..per_tick(trickle_per_s) {
                next = (next + 1) % held.len();
                match trickle(&mut held[next]).await {
                    Ok(()) => counters.trickles.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        counters.error(&counters.trickle_errors, &format!("trickle: {e:#}"));
                        0
                    }
                };
            }
            for _ in 0..per_tick(churn_per_s) {
                next = (next + 1) % held.len();
                match open(to).await {
                    Ok(conn) => {
                        held[next] = conn;
                        counters.churned.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => counters.error(&counters.churn_errors, &format!("churn: {e:#}")),
                }
            }
        }
        drop(held);
        outcome.trickles = counters.trickles.load(Ordering::Relaxed);
        outcome.trickle_errors = counters.trickle_errors.load(Ordering::Relaxed);
        outcome.churned = counters.churned.load(Ordering::Relaxed);
        outcome.churn_errors = counters.churn_errors.load(Ordering::Relaxed);
        outcome.errors.extend(
            counters
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..),
        );
        println!("{}", serde_json::to_string(&outcome)?);
        Ok(())
    })
}

/// What a flood did.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FloodOutcome {
    /// Handshakes started (TCP connected, ClientHello sent).
    pub attempts: u64,
    /// Of those, how many the server refused or failed (all of them, for a peer without a
    /// mesh certificate).
    pub refused: u64,
    /// TCP connections that could not even be made.
    pub connect_errors: u64,
    /// Handshakes that went through: a server that lets an unauthenticated client in.
    pub accepted: u64,
}

/// Accepts any server certificate: the flood is about the server's cost, not trust.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS handshakes against `to` without a client certificate, `concurrency` at a time, for
/// `seconds` (at most `max` attempts): what any pod or host that reaches a node's 15008 can
/// send. Prints a [`FloodOutcome`].
pub fn tls_flood(to: SocketAddr, seconds: f64, concurrency: usize, max: u64) -> Result<()> {
    runtime(1)?.block_on(async move {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let outcome = Arc::new(std::sync::Mutex::new(FloodOutcome::default()));
        let started = Arc::new(AtomicU64::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let (connector, outcome, started) =
                (connector.clone(), outcome.clone(), started.clone());
            workers.spawn(async move {
                while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max {
                    let result = flood_once(&connector, to).await;
                    let mut outcome = outcome.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Err(()) => outcome.connect_errors += 1,
                        Ok(accepted) => {
                            outcome.attempts += 1;
                            if accepted {
                                outcome.accepted += 1;
                            } else {
                                outcome.refused += 1;
                            }
                        }
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
        let outcome = outcome.lock().unwrap_or_else(|p| p.into_inner());
        println!("{}", serde_json::to_string(&*outcome)?);
        Ok(())
    })
}

/// One unauthenticated handshake: `Err` if TCP failed, else whether the server let it through
/// (TLS 1.3 clients learn of a refused certificate on their first read).
async fn flood_once(connector: &tokio_rustls::TlsConnector, to: SocketAddr) -> Result<bool, ()> {
    let Ok(Ok(tcp)) = tokio::time::timeout(WAIT, TcpStream::connect(to)).await else {
        tokio::time::sleep(Duration::from_millis(10)).await;
        return Err(());
    };
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, connector.connect(name, tcp)).await else {
        return Ok(false);
    };
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), tls.read(&mut byte)).await;
    Ok(matches!(read, Ok(Ok(n)) if n > 0) || read.is_err())
}
