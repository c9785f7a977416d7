//! `cargo xtask`: every piece of sluice's automation, so a fresh machine needs only cargo.
//!
//! Kept cheap to compile (clap + anyhow): the heavy lifting lives in the project's own binaries,
//! which the subcommands build and run.

mod fuzz;
mod setup;
mod vm;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sluice's automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, bpf-linker, nightly rust-src, bpffs);
    /// idempotent, prints each step it takes.
    Setup,
    /// Run every test tier (unit, BPF, netns end-to-end for both capture backends, a fuzz
    /// smoke), then the end-to-end tests (capture, HBONE) again on the oldest supported kernel
    /// (5.10) under QEMU. Needs root.
    Test {
        /// Skip the 5.10 kernel leg (a quicker loop while developing; CI never skips it).
        #[arg(long)]
        host_only: bool,
        /// Extra arguments passed to `cargo test` on this machine (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo: a two-node mesh in network namespaces, pods meshed by labelling their
    /// namespace, HBONE, a policy, metrics (`--backend iptables`, `--keep`; `--help` for more).
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks: with no subcommand the whole matrix (direct, iptables, eBPF × passthrough, HBONE) into target/bench/results.json and results.svg; `capture|hbone|pod-start` for one question each (`--help`).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot older kernels under QEMU and run the eBPF load and capture tests inside each
    /// (`--kernel 5.10`, repeatable; `--kernel all` for the whole matrix). Needs root.
    VmTest {
        /// Kernel line to boot: 5.10, 5.15, 6.1 or all.
        #[arg(long = "kernel", required = true)]
        kernels: Vec<String>,
        /// Give up on a kernel after this many minutes.
        #[arg(long, default_value_t = 25)]
        timeout_minutes: u64,
        /// Parallel test threads inside the guest.
        #[arg(long, default_value_t = 2)]
        jobs: u32,
        /// Only run tests whose names contain one of these.
        filter: Vec<String>,
    },
    /// Run the fuzz targets of fuzz/ (cargo-fuzz and nightly, installed if missing): each
    /// replays its regression inputs, then fuzzes for --seconds; a crash fails and names its input.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (cni_plugin, zds_decode, pods_file, mesh_file, policy, hbone_server);
        /// all of them if none is named.
        targets: Vec<String>,
    },
    /// Render deploy/chart/sluice into deploy/manifests/sluice.yaml (helm template with the
    /// chart's defaults); run it after changing the chart, the manifests test checks they agree.
    RenderManifests,
    /// Attach, detach or list capture by hand on an existing netns/cgroup (`cargo xtask load --help`).
    #[command(disable_help_flag = true)]
    Load {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Test { host_only, args } => test(host_only, &args),
        Cmd::Demo { args } => {
            let mut all = vec!["demo".to_owned()];
            all.extend(args);
            run_release_bin("sluice-lab", "sluice-lab", &all)
        }
        Cmd::Bench { args } => {
            let mut all = vec!["bench".to_owned()];
            all.extend(args);
            run_release_bin("sluice-lab", "sluice-lab", &all)
        }
        Cmd::VmTest {
            kernels,
            timeout_minutes,
            jobs,
            filter,
        } => {
            require_root("the guest image holds the capture tests, which run as root")?;
            let kernels = if kernels.iter().any(|k| k == "all") {
                vm::kernel_names().into_iter().map(str::to_owned).collect()
            } else {
                kernels
            };
            let matrix = vm::run(&vm::Options {
                kernels,
                filter,
                timeout: std::time::Duration::from_secs(timeout_minutes * 60),
                jobs,
            })?;
            if !matrix.failures.is_empty() {
                bail!("vm-test failed on {}", matrix.failures.join("; "));
            }
            Ok(())
        }
        Cmd::Fuzz { seconds, targets } => fuzz::command(seconds, &targets),
        Cmd::RenderManifests => {
            setup::ensure()?;
            let root = setup::workspace_root()?;
            let rendered = sluice_deploy::render(&setup::helm_path()?, &root, &[])
                .map_err(anyhow::Error::msg)?;
            let path = root.join(sluice_deploy::MANIFESTS);
            std::fs::write(&path, rendered).with_context(|| format!("write {}", path.display()))?;
            eprintln!("xtask: wrote {}", path.display());
            Ok(())
        }
        Cmd::Load { args } => {
            if !wants_help(&args) {
                setup::ensure()?;
            }
            run_release_bin("sluice-capture", "sluice-load", &args)
        }
    }
}

fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

/// The README's test command: every tier, nothing skipped. The end-to-end tests spawn the
/// workspace's binaries, so those are built first in the same profile. Then each fuzz target
/// for [`fuzz::SMOKE_SECONDS`] after its regression inputs. Then the kernel leg: the
/// eBPF load and capture tests on the oldest supported kernel, booted under QEMU. Ends with one
/// total line, `N passed, N failed`, summed over every test binary and the kernel leg.
fn test(host_only: bool, extra: &[String]) -> Result<()> {
    setup::ensure()?;
    require_root("the netns and BPF tests create namespaces, cgroups and BPF links")?;
    cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(&args)
        .current_dir(setup::workspace_root()?)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    let mut problems = Vec::new();
    if !status.success() || failed > 0 {
        problems.push(format!("tests on this machine failed ({status})"));
    }
    // Every fuzz target briefly, after replaying the inputs that once crashed it.
    match fuzz::run(fuzz::SMOKE_SECONDS, &[]) {
        Ok(fuzzed) => {
            passed += fuzzed.passed;
            failed += fuzzed.failures.len() as u64;
            problems.extend(fuzzed.failures);
        }
        Err(e) => {
            failed += 1;
            problems.push(format!("fuzz targets: {e:#}"));
        }
    }
    if !host_only {
        eprintln!(
            "xtask: kernel leg: the capture tests on Linux {}",
            vm::OLDEST
        );
        let matrix = vm::run(&vm::Options {
            kernels: vec![vm::OLDEST.to_owned()],
            filter: Vec::new(),
            timeout: std::time::Duration::from_secs(20 * 60),
            jobs: 2,
        })?;
        passed += matrix.passed;
        failed += matrix.failed;
        problems.extend(matrix.failures);
    }
    println!("{passed} passed, {failed} failed");
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Reads cargo's `test result: ok. 9 passed; 0 failed; ...` summary.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)
                .map(str::trim)
                .and_then(|n| n.rsplit(' ').next()?.parse::<u64>().ok())
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

fn run_release_bin(package: &str, bin: &str, args: &[String]) -> Result<()> {
    if !wants_help(args) {
        setup::ensure()?;
        require_root("it creates network namespaces, cgroups and BPF links")?;
    }
    // The lab binary spawns the proxy binary next to itself, so build every binary.
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let exe = setup::workspace_root()?.join("target/release").join(bin);
    let mut child = Command::new(&exe)
        .args(args)
        .spawn()
        .with_context(|| format!("run {} (package {package})", exe.display()))?;
    // A Ctrl-C reaches the child too, which then removes what it created: wait for it rather
    // than leave it cleaning up behind the shell's prompt. (Ignored only after the spawn: an
    // ignored signal would be inherited.)
    // SAFETY: signal(2) with SIG_IGN has no preconditions.
    unsafe { libc_signal(SIGINT, SIG_IGN) };
    let status = child.wait()?;
    if !status.success() {
        bail!("{bin} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(setup::workspace_root()?)
        .status()
        .with_context(|| format!("run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc_geteuid() } != 0 {
        bail!("this needs root: {why}; run it as root (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

const SIGINT: i32 = 2;
const SIG_IGN: usize = 1;

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
    #[link_name = "signal"]
    fn libc_signal(signum: i32, handler: usize) -> usize;
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn reads_cargo_test_summaries() {
        assert_eq!(
            parse_test_result("test result: ok. 17 passed; 0 failed; 0 ignored; 0 measured"),
            Some((17, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 9 passed; 8 failed; 0 ignored"),
            Some((9, 8))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
