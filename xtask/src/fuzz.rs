//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (a workspace of its own, built with
//! nightly), each first replaying the inputs that once crashed it (`fuzz/regressions/<target>/`),
//! then fuzzing for a bounded time from its seeds (`fuzz/seeds/<target>/`) and the corpus it
//! grew on this machine (`target/fuzz/corpus/<target>/`). A crash fails the run and names the
//! input that reproduces it (`target/fuzz/artifacts/<target>/`).
//!
//! Built without a sanitizer (`--sanitizer none`) but with debug assertions and overflow
//! checks: the code under test is safe Rust, which AddressSanitizer has nothing to add to, and
//! an ASan build of the proxy's dependency tree takes much longer on these 2-core machines.
//! libFuzzer's coverage guidance and every assertion of the targets stay.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup;

/// Every target, in the order they run (see `fuzz/src/` for what each asserts).
pub const TARGETS: &[&str] = &[
    "cni_plugin",
    "zds_decode",
    "pods_file",
    "mesh_file",
    "policy",
    "hbone_server",
];
/// Seconds of fuzzing per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 20;
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// libFuzzer's bound on one input: a slower one is reported as a hang (a `timeout-…` input).
const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// Beyond its `-max_total_time`, how long a target may take (loading its corpus, finishing
/// the last input) before it is killed.
const GRACE: Duration = Duration::from_secs(120);
const BUILD_FLAGS: &[&str] = &[
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--target-dir",
    "target/fuzz",
];

/// What a run found: targets that passed, and one line per failure.
#[derive(Default)]
pub struct Outcome {
    pub passed: u64,
    pub failures: Vec<String>,
}

/// `cargo xtask fuzz`: fails if any target crashed.
pub fn command(seconds: u64, targets: &[String]) -> Result<()> {
    select(targets)?;
    setup::ensure()?;
    let outcome = run(seconds, targets)?;
    if !outcome.failures.is_empty() {
        bail!("{}", outcome.failures.join("; "));
    }
    Ok(())
}

/// Builds the targets, then replays and fuzzes each for `seconds` (all targets if none named).
pub fn run(seconds: u64, targets: &[String]) -> Result<Outcome> {
    let targets = select(targets)?;
    ensure_cargo_fuzz()?;
    let root = setup::workspace_root()?;
    let started = Instant::now();
    let mut build = vec!["fuzz", "build"];
    build.extend(BUILD_FLAGS);
    // One target or all of them (they share one crate: the rest is a few more links).
    if let [one] = targets.as_slice() {
        build.push(one);
    }
    say(&format!("cargo +nightly {}", build.join(" ")));
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo"])
        .args(&build)
        .current_dir(&root)
        .status()
        .context("run cargo fuzz build with nightly")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    let built = started.elapsed();
    let bin_dir = root
        .join("target/fuzz")
        .join(host_triple()?)
        .join("release");
    let mut outcome = Outcome::default();
    for target in &targets {
        let runner = Runner {
            root: &root,
            target,
            bin: bin_dir.join(target),
        };
        let result = runner.replay().and_then(|()| runner.fuzz(seconds));
        match result {
            Ok(()) => outcome.passed += 1,
            Err(e) => {
                eprintln!("xtask fuzz: {target}: FAILED: {e:#}");
                outcome
                    .failures
                    .push(format!("fuzz target {target}: {e:#}"));
            }
        }
    }
    say(&format!(
        "build {:.0} s, then {} target(s) for {seconds} s each: {:.0} s in all; {} passed, {} failed",
        built.as_secs_f64(),
        targets.len(),
        started.elapsed().as_secs_f64(),
        outcome.passed,
        outcome.failures.len()
    ));
    Ok(outcome)
}

fn select(names: &[String]) -> Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .copied()
                .find(|t| t == name)
                .with_context(|| {
                    format!(
                        "no fuzz target {name:?}; the targets: {}",
                        TARGETS.join(", ")
                    )
                })
        })
        .collect()
}

/// Installs cargo-fuzz (pinned, `--locked`) unless `cargo fuzz` already answers.
fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    say(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install --locked, about a minute)"
    ));
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .status()
        .context("run cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status}); is crates.io reachable?");
    }
    Ok(())
}

/// The directory cargo-fuzz builds into is named after the host (its default `--target`).
fn host_triple() -> Result<String> {
    let version = setup::capture(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("nightly rustc -vV names no host")
}

struct Runner<'a> {
    root: &'a Path,
    target: &'a str,
    bin: PathBuf,
}

impl Runner<'_> {
    fn dir(&self, what: &str) -> PathBuf {
        self.root.join(what).join(self.target)
    }

    /// Every input of `fuzz/regressions/<target>/`, once each.
    fn replay(&self) -> Result<()> {
        let dir = self.dir("fuzz/regressions");
        let mut inputs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
        };
        if inputs.is_empty() {
            return Ok(());
        }
        inputs.sort();
        let log = self.log("replay")?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&inputs)
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-artifact_prefix={}/", self.artifacts()?.display()));
        let ok = run_logged(&mut cmd, &log, Duration::from_secs(60) + GRACE)?;
        if !ok {
            self.report(&log, "a regression input crashes it again")?;
            bail!(
                "a regression input of {} fails again (log: {})",
                dir.display(),
                log.display()
            );
        }
        say(&format!(
            "{}: {} regression input(s) pass",
            self.target,
            inputs.len()
        ));
        Ok(())
    }

    /// Fuzzes for `seconds` from the working corpus and the seeds.
    fn fuzz(&self, seconds: u64) -> Result<()> {
        let corpus = self.dir("target/fuzz/corpus");
        std::fs::create_dir_all(&corpus).with_context(|| format!("create {}", corpus.display()))?;
        let log = self.log("fuzz")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg(&corpus)
            .arg(self.dir("fuzz/seeds"))
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-artifact_prefix={}/", self.artifacts()?.display()))
            .arg("-print_final_stats=1");
        let ok = run_logged(&mut cmd, &log, Duration::from_secs(seconds) + GRACE)?;
        if !ok {
            let input = self.report(&log, "crashed")?;
            bail!(
                "crashed on {} (log: {})",
                input.map_or_else(
                    || "an input libFuzzer did not save".to_owned(),
                    |p| p.display().to_string()
                ),
                log.display()
            );
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stat = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map_or("?", str::trim)
                .to_owned()
        };
        say(&format!(
            "{}: {} inputs in {seconds} s ({}/s), {} new in the corpus, no crash",
            self.target,
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            stat("new_units_added"),
        ));
        Ok(())
    }

    fn artifacts(&self) -> Result<PathBuf> {
        let dir = self.dir("target/fuzz/artifacts");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    fn log(&self, what: &str) -> Result<PathBuf> {
        let dir = self.root.join("target/fuzz/logs");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir.join(format!("{}-{what}.log", self.target)))
    }

    /// Prints what failed (the panic and its stack) and how to reproduce it; returns the input.
    fn report(&self, log: &Path, what: &str) -> Result<Option<PathBuf>> {
        let text =
            std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let from = lines
            .iter()
            .position(|l| l.contains("panicked at") || l.contains("ERROR: libFuzzer"))
            .unwrap_or(lines.len().saturating_sub(30));
        eprintln!("xtask fuzz: {}: {what}:", self.target);
        for line in lines.iter().skip(from).take(40) {
            eprintln!("    {line}");
        }
        let input = lines
            .iter()
            .find_map(|l| l.split("Test unit written to ").nth(1))
            .map(|p| self.root.join(p.trim()));
        if let Some(input) = &input {
            let shown = input.strip_prefix(self.root).unwrap_or(input).display();
            eprintln!(
                "xtask fuzz: reproduce: cargo +nightly fuzz run {} {} {shown}\n\
                 xtask fuzz: once fixed, keep it as a regression test: cp {shown} fuzz/regressions/{}/<what-it-is>",
                BUILD_FLAGS.join(" "),
                self.target,
                self.target
            );
        }
        Ok(input)
    }
}

/// Runs `cmd` with its output in `log`, killed after `bound`; whether it succeeded.
fn run_logged(cmd: &mut Command, log: &Path, bound: Duration) -> Result<bool> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{:?} still ran after {} s; killed (log: {})",
                cmd.get_program(),
                bound.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn say(what: &str) {
    eprintln!("xtask fuzz: {what}");
}
