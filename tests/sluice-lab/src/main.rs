//! `sluice-lab`: runs the demo and the benchmarks on a lab, and is the workload binary inside
//! the lab's pods (`app serve|connect|connrate|rr|hold|session`).

use std::net::SocketAddr;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// sluice's main job on a two-node cluster of network namespaces: pods meshed by labelling
    /// their namespace, HBONE with both identities, a policy allowing sleep and resetting
    /// notsleep, the metrics that moved.
    Demo {
        /// The capture backend: ebpf or iptables.
        #[arg(long, default_value = "ebpf")]
        backend: sluice_capture::Backend,
        /// Leave the cluster running (with the commands to explore it) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks: with no subcommand the whole matrix (direct, iptables, eBPF × passthrough,
    /// HBONE) with a chart; `capture`, `hbone`, `pod-start` for one question each.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        which: Option<sluice_lab::bench::Which>,
        #[command(flatten)]
        matrix: sluice_lab::bench::MatrixArgs,
    },
    /// Workloads run inside lab pods.
    #[command(subcommand, hide = true)]
    App(App),
}

#[derive(Subcommand)]
enum App {
    /// Echo server: greets each client with the address it saw, then echoes.
    Serve {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// HTTP server: answers every request 200 with the client address it saw.
    HttpServe {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// One HTTP GET as kubelet's probe sends it; prints a JSON outcome.
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
    },
    /// One client connection; prints a JSON outcome.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
    },
    /// Short connections in a loop for a while; prints a JSON summary.
    Connrate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1_000_000)]
        max: u64,
    },
    /// Request/response round trips on one connection; prints p50/p99 as JSON.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// One connection; an echo round trip per stdin line.
    Session {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Opens connections and holds them until stdin closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Tries `count` connections, holds those that opened until stdin closes; prints a JSON
    /// count of opened and refused (a connect storm).
    Storm {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Short echo connections in a loop (each closed with a reset, so no TIME_WAIT holds its
    /// port); prints a JSON count of those that worked and the first errors.
    Repeat {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 100_000)]
        max: u64,
    },
    /// The soak's echo server: a task per connection (tokio), greeting as `serve` does.
    SoakServe {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// The soak's holder: opens `count` connections, prints `open N`, then trickles round trips
    /// and churns connections until stdin closes; prints a JSON outcome.
    SoakHold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        trickle_per_s: u32,
        #[arg(long, default_value_t = 10)]
        churn_per_s: u32,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// Hostile: TLS handshakes without a client certificate against an HBONE port, in a loop;
    /// prints a JSON count.
    TlsFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10_000_000)]
        max: u64,
    },
    /// Hostile: one connection from a source the pod does not own (`IP_TRANSPARENT`), trying
    /// to read the app's greeting; prints a JSON outcome.
    Forge {
        #[arg(long)]
        from: std::net::IpAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Hostile: connects from another pod's address (`IP_TRANSPARENT`) on each port of a range,
    /// in a loop, to `to`; prints a JSON count of attempts.
    Spoof {
        #[arg(long)]
        from: std::net::IpAddr,
        #[arg(long)]
        first_port: u16,
        #[arg(long)]
        ports: u16,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        /// Microseconds to wait between attempts.
        #[arg(long, default_value_t = 0)]
        pause_us: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo { backend, keep } => {
            sluice_lab::demo::catch_interrupts();
            sluice_lab::demo::run(sluice_lab::demo::Options { backend, keep }).map(|_| ())
        }
        Cmd::Bench { which, matrix } => match which {
            Some(which) => sluice_lab::bench::run(which),
            None => sluice_lab::bench::run_matrix(&matrix),
        },
        Cmd::App(App::Serve { listen }) => sluice_lab::app::serve(&listen),
        Cmd::App(App::Forge { from, to }) => {
            println!(
                "{}",
                serde_json::to_string(&sluice_lab::hostile::forge(from, to))?
            );
            Ok(())
        }
        Cmd::App(App::HttpServe { listen }) => sluice_lab::app::http_serve(&listen),
        Cmd::App(App::HttpGet { to }) => {
            println!("{}", serde_json::to_string(&sluice_lab::app::http_get(to))?);
            Ok(())
        }
        Cmd::App(App::Connect { to, bytes }) => {
            println!(
                "{}",
                serde_json::to_string(&sluice_lab::app::connect(to, bytes))?
            );
            Ok(())
        }
        Cmd::App(App::Rr { to, seconds, size }) => {
            println!("{}", sluice_lab::app::rr(to, seconds, size)?);
            Ok(())
        }
        Cmd::App(App::Hold { to, count }) => sluice_lab::app::hold(to, count),
        Cmd::App(App::SoakServe { listen }) => sluice_lab::soak::serve(&listen),
        Cmd::App(App::SoakHold {
            to,
            count,
            trickle_per_s,
            churn_per_s,
            max_seconds,
        }) => sluice_lab::soak::hold(to, count, trickle_per_s, churn_per_s, max_seconds),
        Cmd::App(App::TlsFlood {
            to,
            seconds,
            concurrency,
            max,
        }) => sluice_lab::soak::tls_flood(to, seconds, concurrency, max),
        Cmd::App(App::Storm { to, count }) => sluice_lab::hostile::storm(to, count),
        Cmd::App(App::Repeat { to, seconds, max }) => {
            println!("{}", sluice_lab::hostile::repeat(to, seconds, max));
            Ok(())
        }
        Cmd::App(App::Spoof {
            from,
            first_port,
            ports,
            to,
            seconds,
            pause_us,
        }) => {
            let pause = std::time::Duration::from_micros(pause_us);
            println!(
                "{}",
                sluice_lab::hostile::spoof(from, first_port, ports, to, seconds, pause)
            );
            Ok(())
        }
        Cmd::App(App::Session { to }) => sluice_lab::app::session(to),
        Cmd::App(App::Connrate { to, seconds, max }) => {
            println!("{}", sluice_lab::app::connrate(to, seconds, max));
            Ok(())
        }
    }
}
