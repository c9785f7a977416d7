//! `cargo xtask`: every piece of sluice's automation, so a fresh machine needs only cargo.
//!
//! Kept cheap to compile (clap + anyhow): the heavy lifting lives in the project's own binaries,
//! which the subcommands build and run.

mod setup;

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
    /// Run every test tier (unit, BPF, netns end-to-end for both capture backends). Needs root.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the demo: two network namespaces, one pod captured with eBPF, traffic through the proxy.
    Demo,
    /// Run a benchmark: `cargo xtask bench capture [--runs N] [--seconds S]`.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        Cmd::Test { args } => test(&args),
        Cmd::Demo => run_release_bin("sluice-lab", "sluice-lab", &["demo".to_owned()]),
        Cmd::Bench { args } => {
            let mut all = vec!["bench".to_owned()];
            all.extend(args);
            run_release_bin("sluice-lab", "sluice-lab", &all)
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
/// workspace's binaries, so those are built first in the same profile.
fn test(extra: &[String]) -> Result<()> {
    setup::ensure()?;
    require_root("the netns and BPF tests create namespaces, cgroups and BPF links")?;
    cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn run_release_bin(package: &str, bin: &str, args: &[String]) -> Result<()> {
    if !wants_help(args) {
        setup::ensure()?;
    }
    // The lab binary spawns the proxy binary next to itself, so build every binary.
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let exe = setup::workspace_root()?.join("target/release").join(bin);
    let status = Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| format!("run {} (package {package})", exe.display()))?;
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

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
