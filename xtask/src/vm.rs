//! `cargo xtask vm-test --kernel 5.10|5.15|6.1`: runs the eBPF load and capture tests on older
//! kernels, each booted under QEMU, so a verifier that is stricter than this machine's is found
//! here and not on a user's node.
//!
//! The kernels are distribution builds, the ones users run: Debian bullseye's 5.10 and bookworm's
//! 6.1 `cloud-amd64` images, and Ubuntu jammy's 5.15 `generic` image (Debian never shipped 5.15
//! in a suite that is still on its mirrors). They are fetched with `apt-get download` against a
//! private apt state under `target/vm/`, so apt checks the archive signatures and nothing on the
//! host's own apt configuration changes. Downloads and extracted trees are cached there.
//!
//! The guest has no disk: an initramfs carries busybox (init, `modprobe`), the host's `ip` and
//! `iptables` with the shared libraries they load, the kernel's networking modules (veth and
//! netfilter are modules in these builds; the kernel loads them on demand through busybox's
//! `modprobe`), and the workspace's test binaries at the same absolute paths as on the host,
//! because the tests find `sluice-lab` and `sluice-proxy` through paths compiled into them.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup;

/// A kernel the matrix can boot.
struct KernelSpec {
    name: &'static str,
    /// deb822 sources for the private apt state; `{keyring}` stands for the keyring's path.
    sources: &'static str,
    /// Metapackage whose dependencies name the newest kernel image of that line.
    meta: &'static str,
    keyring: Keyring,
}

/// The OpenPGP keyring that apt checks the archive's signatures with.
enum Keyring {
    /// A file from a Debian package on this machine (installed when missing).
    Host {
        path: &'static str,
        package: &'static str,
    },
    /// A keyring package fetched from the archive itself, accepted only with this SHA-256 (the
    /// hash pins the trust; Debian does not package Ubuntu's keyring).
    Pinned {
        url: &'static str,
        sha256: &'static str,
        member: &'static str,
    },
}

const DEBIAN_KEYRING: Keyring = Keyring::Host {
    path: "/usr/share/keyrings/debian-archive-keyring.gpg",
    package: "debian-archive-keyring",
};

const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        sources: "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bullseye\nComponents: main\n\
                  Signed-By: {keyring}\n\n\
                  Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bullseye-security\n\
                  Components: main\nSigned-By: {keyring}\n",
        meta: "linux-image-cloud-amd64",
        keyring: DEBIAN_KEYRING,
    },
    KernelSpec {
        name: "5.15",
        sources: "Types: deb\nURIs: http://archive.ubuntu.com/ubuntu\n\
                  Suites: jammy jammy-updates jammy-security\nComponents: main\n\
                  Signed-By: {keyring}\n",
        meta: "linux-image-generic",
        keyring: Keyring::Pinned {
            url: "http://archive.ubuntu.com/ubuntu/pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb",
            sha256: "0d0e7ed6b112f5d03eabf3c7eb01ebdacf9c57714b279e90495cfc58c8c4520f",
            member: "usr/share/keyrings/ubuntu-archive-keyring.gpg",
        },
    },
    KernelSpec {
        name: "6.1",
        sources: "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                  Components: main\nSigned-By: {keyring}\n\n\
                  Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
                  Components: main\nSigned-By: {keyring}\n",
        meta: "linux-image-cloud-amd64",
        keyring: DEBIAN_KEYRING,
    },
];

/// Host tools the guest needs, with what uses them.
const GUEST_TOOLS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/sbin/xtables-nft-multi",
    "/usr/sbin/iptables",
    "/usr/sbin/ip6tables",
    "/usr/sbin/iptables-save",
    "/usr/sbin/ip6tables-save",
    "/usr/sbin/iptables-restore",
    "/usr/sbin/ip6tables-restore",
    // The reference CNI plugins the agent tests chain sluice-cni after.
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
];
/// iptables loads its match and target extensions with dlopen from here.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
/// Module subtrees the tests can need: veth, netfilter (and what it depends on).
const MODULE_DIRS: &[&str] = &[
    "kernel/net",
    "kernel/lib",
    "kernel/crypto",
    "kernel/drivers/net/veth.ko",
];
/// Printed by the guest's init; everything the host learns comes from these lines.
const MARK: &str = "sluice-vm:";

pub struct Options {
    pub kernels: Vec<String>,
    pub filter: Vec<String>,
    pub timeout: Duration,
    pub jobs: u32,
}

pub fn kernel_names() -> Vec<&'static str> {
    KERNELS.iter().map(|k| k.name).collect()
}

/// The oldest kernel line of the matrix: the leg `cargo xtask test` runs.
pub const OLDEST: &str = "5.10";

/// What the matrix found, over every kernel it booted.
pub struct Matrix {
    pub passed: u64,
    pub failed: u64,
    /// One line per kernel that did not pass, saying why.
    pub failures: Vec<String>,
}

/// Boots each kernel of `opts` in turn and runs the tests in it; prints a table at the end.
pub fn run(opts: &Options) -> Result<Matrix> {
    let mut specs = Vec::new();
    for name in &opts.kernels {
        let spec = KERNELS.iter().find(|k| k.name == name).with_context(|| {
            format!(
                "no kernel {name} in the matrix; choose from {}",
                kernel_names().join(", ")
            )
        })?;
        specs.push(spec);
    }
    setup::ensure()?;
    setup::apt_install(
        &["qemu-system-x86", "busybox-static", "ca-certificates"],
        "booting test kernels (cargo xtask vm-test)",
    )?;
    let root = setup::workspace_root()?;
    let cache = root.join("target/vm");
    let binaries = build_test_binaries(&root)?;
    let accel = Accel::detect(&cache)?;
    let mut results = Vec::new();
    for spec in specs {
        let kernel = fetch_kernel(spec, &cache.join("kernels").join(spec.name))?;
        let initrd = cache.join(format!("initramfs-{}.cpio", spec.name));
        build_initramfs(&kernel, &binaries, &opts.filter, opts.jobs, &initrd)?;
        let log = cache.join(format!("console-{}.log", spec.name));
        eprintln!(
            "xtask vm-test: booting {} ({}) under {}, console in {}",
            spec.name,
            kernel.release,
            accel.describe(),
            log.display()
        );
        let outcome = boot(&kernel, &initrd, &accel, opts.timeout, &log, true)?;
        results.push((spec.name, kernel.release.clone(), outcome));
    }
    println!();
    println!(
        "{:<6} {:<28} {:<6} {:>6} {:>6} {:>8}",
        "kernel", "release", "result", "passed", "failed", "time"
    );
    let mut matrix = Matrix {
        passed: 0,
        failed: 0,
        failures: Vec::new(),
    };
    for (name, release, o) in &results {
        let verdict = if o.ok() { "PASS" } else { "FAIL" };
        println!(
            "{name:<6} {release:<28} {verdict:<6} {:>6} {:>6} {:>7.0}s",
            o.passed,
            o.failed,
            o.elapsed.as_secs_f64()
        );
        matrix.passed += o.passed;
        // A kernel that failed without a failing test (boot, timeout, check) counts as one.
        matrix.failed += if o.ok() { 0 } else { o.failed.max(1) };
        if !o.ok() {
            matrix.failures.push(format!(
                "{name} ({release}): {}; see the console log in target/vm/console-{name}.log",
                o.reason()
            ));
        }
    }
    Ok(matrix)
}

/// The test binaries that run in the guest, by their host paths.
struct TestBinaries {
    /// Spawned by the tests through paths compiled into them.
    bins: Vec<PathBuf>,
    /// The end-to-end test executable.
    e2e: PathBuf,
}

fn build_test_binaries(root: &Path) -> Result<TestBinaries> {
    crate::cargo(&["build", "--workspace", "--bins"])?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(&cargo)
        .args([
            "test",
            "-p",
            "sluice-lab",
            "--test",
            "e2e",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("build the end-to-end test binary")?;
    if !out.status.success() {
        bail!(
            "building the end-to-end test binary failed ({})",
            out.status
        );
    }
    // One JSON object per line; the test executable is the artifact with `"test":true`.
    let e2e = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"")
                && l.contains("\"kind\":[\"test\"],\"crate_types\":[\"bin\"],\"name\":\"e2e\"")
        })
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .context("cargo did not report the e2e test executable")?;
    let dir = root.join("target/debug");
    // sluice-load stays third: the guest's init runs it by index.
    let bins = [
        "sluice-lab",
        "sluice-proxy",
        "sluice-load",
        "sluice-cni-agent",
        "sluice-cni",
    ]
    .iter()
    .map(|b| dir.join(b))
    .collect();
    Ok(TestBinaries { bins, e2e })
}

/// A kernel extracted from its packages.
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn fetch_kernel(spec: &KernelSpec, dir: &Path) -> Result<Kernel> {
    let keyring = keyring(&spec.keyring, dir)?;
    let sources = spec
        .sources
        .replace("{keyring}", keyring.to_str().context("keyring path")?);
    let apt = AptState::new(dir, &sources)?;
    let debs_dir = dir.join("debs");
    fs::create_dir_all(&debs_dir)?;
    let packages = apt.resolve_kernel_packages(spec.meta)?;
    let mut debs = Vec::new();
    for package in &packages {
        let prefix = format!("{package}_");
        let cached = fs::read_dir(&debs_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            });
        let deb = match cached {
            Some(deb) => deb,
            None => {
                eprintln!("xtask vm-test: downloading {package} for {}", spec.name);
                apt.download(package, &debs_dir)?;
                fs::read_dir(&debs_dir)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&prefix))
                    })
                    .with_context(|| format!("apt-get download {package} left no .deb"))?
            }
        };
        debs.push(deb);
    }
    let tree = dir.join("root");
    let stamp = dir.join("extracted-from");
    let wanted: String = debs.iter().map(|d| format!("{}\n", d.display())).collect();
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = fs::remove_dir_all(&tree);
        fs::create_dir_all(&tree)?;
        for deb in &debs {
            setup::run_quiet(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
        }
        fs::write(&stamp, &wanted)?;
    }
    let boot = tree.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ dir", tree.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("the kernel package has no vmlinuz")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_owned();
    let modules = [
        tree.join("lib/modules").join(&release),
        tree.join("usr/lib/modules").join(&release),
    ]
    .into_iter()
    .find(|p| p.is_dir())
    .with_context(|| format!("the packages hold no modules for {release}"))?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

fn keyring(keyring: &Keyring, dir: &Path) -> Result<PathBuf> {
    match keyring {
        Keyring::Host { path, package } => {
            setup::apt_install(&[package], "checking the kernel archive's signatures")?;
            Ok(PathBuf::from(path))
        }
        Keyring::Pinned {
            url,
            sha256,
            member,
        } => {
            let unpacked = dir.join("keyring");
            let path = unpacked.join(member);
            if path.exists() {
                return Ok(path);
            }
            setup::apt_install(&["curl"], "fetching the kernel archive's keyring")?;
            let deb = dir.join("keyring.deb");
            fs::create_dir_all(dir)?;
            setup::run_quiet(
                Command::new("curl")
                    .args(["-fsSL", "--max-time", "120", "-o"])
                    .arg(&deb)
                    .arg(url),
            )
            .with_context(|| format!("download {url}"))?;
            let sum = setup::capture(Command::new("sha256sum").arg(&deb))?;
            if sum.split_whitespace().next() != Some(sha256) {
                let _ = fs::remove_file(&deb);
                bail!("{url} has SHA-256 {sum:.64}, expected {sha256}; refusing to trust it");
            }
            setup::run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            Ok(path)
        }
    }
}

/// apt with its own sources, lists and cache: signatures checked, the host's apt untouched.
struct AptState {
    options: Vec<String>,
}

impl AptState {
    fn new(dir: &Path, sources: &str) -> Result<Self> {
        let parts = dir.join("apt/sources.list.d");
        let lists = dir.join("apt/lists");
        let cache = dir.join("apt/cache");
        for d in [
            &parts,
            &lists.join("partial"),
            &cache.join("archives/partial"),
        ] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        fs::write(parts.join("kernel.sources"), sources)?;
        let options = [
            "Dir::Etc::SourceList=/dev/null".to_owned(),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            "Dir::State::status=/dev/null".to_owned(),
            "APT::Architecture=amd64".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
            "Acquire::Languages=none".to_owned(),
        ];
        let state = Self {
            options: options
                .iter()
                .flat_map(|o| ["-o".to_owned(), o.clone()])
                .collect(),
        };
        // Refresh at most daily: the lists decide which kernel build is newest.
        let fresh = fs::metadata(dir.join("apt/updated"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                t.elapsed()
                    .is_ok_and(|age| age < Duration::from_secs(86_400))
            });
        if !fresh {
            setup::run_quiet(
                Command::new("apt-get")
                    .args(&state.options)
                    .args(["-q", "update"]),
            )
            .context("apt-get update for the kernel archive failed; is the mirror reachable?")?;
            fs::write(dir.join("apt/updated"), "")?;
        }
        Ok(state)
    }

    /// The metapackage's kernel image and module packages, followed through their dependencies
    /// (Ubuntu splits the image, its modules and the extra modules into three packages).
    fn resolve_kernel_packages(&self, meta: &str) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut queue = vec![meta.to_owned()];
        while let Some(package) = queue.pop() {
            let out = setup::capture(
                Command::new("apt-cache")
                    .args(&self.options)
                    .args(["depends", &package]),
            )?;
            for dep in out
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
            {
                let dep = dep.trim_start_matches('<').trim_end_matches('>').to_owned();
                let versioned = dep
                    .strip_prefix("linux-image-")
                    .or_else(|| dep.strip_prefix("linux-modules-"));
                let is_kernel =
                    versioned.is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()));
                if is_kernel && !found.contains(&dep) {
                    found.push(dep.clone());
                    queue.push(dep);
                }
            }
        }
        if !found.iter().any(|p| p.starts_with("linux-image-")) {
            bail!("{meta} depends on no versioned linux-image package");
        }
        found.sort();
        Ok(found)
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        setup::run_quiet(
            Command::new("apt-get")
                .args(&self.options)
                .args(["-q", "download", package])
                .current_dir(into),
        )
    }
}

/// How QEMU runs the guest.
struct Accel {
    kvm: bool,
}

impl Accel {
    /// KVM when a guest really boots with it (on nested virtualisation `/dev/kvm` can exist and
    /// still hang every guest), otherwise TCG. The probe boots nothing but a shell that powers off.
    fn detect(cache: &Path) -> Result<Self> {
        if fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return Ok(Self { kvm: false });
        }
        // The answer holds until the host reboots: remember it under this boot's id.
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let memo = cache.join("kvm-probe");
        if let Ok(seen) = fs::read_to_string(&memo)
            && let Some((id, answer)) = seen.split_once(' ')
            && id == boot_id.trim()
        {
            return Ok(Self {
                kvm: answer.trim() == "kvm",
            });
        }
        let Some(spec) = KERNELS.first() else {
            return Ok(Self { kvm: false });
        };
        let kernel = fetch_kernel(spec, &cache.join("kernels").join(spec.name))?;
        let initrd = cache.join("initramfs-probe.cpio");
        let mut cpio = Cpio::create(&initrd)?;
        cpio.file_from_host("/bin/busybox", Path::new("/bin/busybox"))?;
        cpio.bytes(
            "/init",
            0o755,
            format!(
                "#!/bin/busybox sh\n/bin/busybox echo {MARK} exit=0\n/bin/busybox poweroff -f\n"
            )
            .as_bytes(),
        )?;
        cpio.finish()?;
        let log = cache.join("console-kvm-probe.log");
        let probe = Self { kvm: true };
        let works = boot(
            &kernel,
            &initrd,
            &probe,
            Duration::from_secs(20),
            &log,
            false,
        )
        .is_ok_and(|o| o.exit == Some(0));
        if !works {
            eprintln!(
                "xtask vm-test: /dev/kvm is present but a KVM guest did not boot in 20 s \
                 (nested virtualisation?); using TCG"
            );
        }
        let answer = if works { "kvm" } else { "tcg" };
        fs::write(&memo, format!("{} {answer}\n", boot_id.trim()))?;
        Ok(Self { kvm: works })
    }

    fn describe(&self) -> &'static str {
        if self.kvm {
            "KVM"
        } else {
            "TCG (software emulation, slower)"
        }
    }

    fn args(&self) -> &'static [&'static str] {
        if self.kvm {
            &["-accel", "kvm", "-cpu", "host"]
        } else {
            &["-accel", "tcg", "-cpu", "max"]
        }
    }
}

fn build_initramfs(
    kernel: &Kernel,
    tests: &TestBinaries,
    filter: &[String],
    jobs: u32,
    out: &Path,
) -> Result<()> {
    let mut cpio = Cpio::create(out)?;
    cpio.file_from_host("/bin/busybox", Path::new("/bin/busybox"))
        .context("busybox-static provides the guest's init and modprobe")?;
    cpio.symlink("/sbin/modprobe", "/bin/busybox")?;
    let mut elves: Vec<PathBuf> = Vec::new();
    for tool in GUEST_TOOLS {
        let path = Path::new(tool);
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("{tool} is missing on the host"))?;
        if meta.file_type().is_symlink() {
            // Keep the multi-call binary's links: iptables dispatches on argv[0].
            let target = fs::canonicalize(path)?;
            cpio.symlink(tool, target.to_str().context("path")?)?;
        } else {
            cpio.file_from_host(tool, path)?;
            elves.push(path.to_owned());
        }
    }
    for entry in fs::read_dir(XTABLES_DIR).with_context(|| format!("read {XTABLES_DIR}"))? {
        let path = entry?.path();
        cpio.file_from_host(path.to_str().context("path")?, &path)?;
        elves.push(path);
    }
    for bin in tests.bins.iter().chain([&tests.e2e]) {
        cpio.stripped_binary(bin)?;
        elves.push(bin.clone());
    }
    for lib in shared_libraries(&elves)? {
        cpio.file_from_host(lib.to_str().context("path")?, &lib)?;
    }
    add_modules(&mut cpio, kernel)?;
    // The CA bundle: kube-rs's TLS client loads the system roots when it is built, even for a
    // plain-HTTP API server (the agent's Kubernetes-mode test).
    for etc in [
        "/etc/protocols",
        "/etc/services",
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        if Path::new(etc).exists() {
            cpio.file_from_host(etc, Path::new(etc))?;
        }
    }
    let e2e = tests.e2e.to_str().context("path")?;
    let load = tests.bins[2].to_str().context("path")?;
    cpio.bytes(
        "/init",
        0o755,
        init_script(e2e, load, filter, jobs).as_bytes(),
    )?;
    cpio.finish()
}

fn init_script(e2e: &str, load: &str, filter: &[String], jobs: u32) -> String {
    let filter: String = filter
        .iter()
        .map(|f| format!(" '{}'", f.replace('\'', "")))
        .collect();
    format!(
        r#"#!/bin/busybox sh
# Guest init: mount what the tests use, run them, report, power off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0
# The root is the unpacked initramfs, already writable: /tmp stays a plain directory (a mount
# there would hide a workspace that lives under /tmp).
mkdir -p /proc /sys /dev /tmp /run /root /var
chmod 1777 /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
ln -s /run /var/run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# The packages ship no modules.dep (depmod runs at install); busybox makes it. veth is loaded
# up front, netfilter modules load on demand through /sbin/modprobe.
depmod
for m in veth; do modprobe $m || echo "{MARK} modprobe $m failed"; done
echo "{MARK} kernel=$(uname -r)"
{load} --check-kernel
echo "{MARK} check-kernel=$?"
{e2e} --test-threads={jobs}{filter}
echo "{MARK} exit=$?"
poweroff -f
"#
    )
}

/// Every shared library `elves` load, transitively (ldd resolves the whole tree).
fn shared_libraries(elves: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = std::collections::BTreeSet::new();
    for elf in elves {
        let out = Command::new("ldd").arg(elf).output().context("run ldd")?;
        libs.extend(parse_ldd(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(libs.into_iter().collect())
}

/// The library paths in ldd's output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`
/// or `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file and is skipped.
fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        })
        .filter(|path| path.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

fn add_modules(cpio: &mut Cpio, kernel: &Kernel) -> Result<()> {
    let guest_dir = format!("/lib/modules/{}", kernel.release);
    for entry in fs::read_dir(&kernel.modules)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?
            .to_owned();
        if name.starts_with("modules.") && path.is_file() {
            cpio.file_from_host(&format!("{guest_dir}/{name}"), &path)?;
        }
    }
    for sub in MODULE_DIRS {
        let path = kernel.modules.join(sub);
        if path.exists() {
            add_tree(cpio, &path, &format!("{guest_dir}/{sub}"))?;
        }
    }
    Ok(())
}

fn add_tree(cpio: &mut Cpio, host: &Path, guest: &str) -> Result<()> {
    let meta = fs::symlink_metadata(host)?;
    if meta.is_dir() {
        for entry in fs::read_dir(host)? {
            let entry = entry?;
            let name = entry.file_name();
            add_tree(
                cpio,
                &entry.path(),
                &format!("{guest}/{}", name.to_string_lossy()),
            )?;
        }
    } else if meta.is_file() {
        cpio.file_from_host(guest, host)?;
    }
    Ok(())
}

/// What the guest reported.
struct Outcome {
    exit: Option<i32>,
    check_kernel: Option<i32>,
    passed: u64,
    failed: u64,
    failures: Vec<String>,
    timed_out: bool,
    elapsed: Duration,
}

impl Outcome {
    fn new() -> Self {
        Self {
            exit: None,
            check_kernel: None,
            passed: 0,
            failed: 0,
            failures: Vec::new(),
            timed_out: false,
            elapsed: Duration::ZERO,
        }
    }

    /// Takes in one console line: the init's markers and the test harness's own lines.
    fn observe(&mut self, line: &str) {
        if let Some(rest) = line.split_once(MARK).map(|(_, r)| r.trim()) {
            if let Some(code) = rest.strip_prefix("exit=") {
                self.exit = code.parse().ok();
            } else if let Some(code) = rest.strip_prefix("check-kernel=") {
                self.check_kernel = code.parse().ok();
            }
        }
        if let Some((p, f)) = crate::parse_test_result(line) {
            self.passed += p;
            self.failed += f;
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            self.failures.push(name.to_owned());
        }
    }

    fn ok(&self) -> bool {
        self.exit == Some(0) && self.check_kernel == Some(0) && self.failed == 0 && self.passed > 0
    }

    fn reason(&self) -> String {
        if self.timed_out {
            return "timed out".to_owned();
        }
        let mut why = Vec::new();
        if self.check_kernel != Some(0) {
            why.push("sluice-load --check-kernel failed".to_owned());
        }
        if !self.failures.is_empty() {
            why.push(format!("failed: {}", self.failures.join(", ")));
        }
        match self.exit {
            None => why.push("the guest never reported an exit status".to_owned()),
            Some(0) if self.passed == 0 => why.push("no test ran".to_owned()),
            _ => {}
        }
        why.join("; ")
    }
}

fn boot(
    kernel: &Kernel,
    initrd: &Path,
    accel: &Accel,
    timeout: Duration,
    log: &Path,
    echo: bool,
) -> Result<Outcome> {
    let mut file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    // A probe keeps QEMU's complaints in its log; a real run shows them.
    let stderr = if echo {
        Stdio::inherit()
    } else {
        Stdio::from(file.try_clone()?)
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args([
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned(),
                )
                .is_err()
            {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut outcome = Outcome::new();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if echo {
                    println!("  | {line}");
                }
                outcome.observe(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                outcome.timed_out = true;
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// A `newc` cpio archive, the format the kernel unpacks as its initramfs. Written here rather
/// than with cpio(1) so the guest's paths need not exist on the host.
struct Cpio {
    out: std::io::BufWriter<fs::File>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
    files: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            out: std::io::BufWriter::new(file),
            ino: 1,
            dirs: Default::default(),
            files: Default::default(),
        })
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..pad])?;
        Ok(())
    }

    /// Creates `path`'s parent directories once each.
    fn parents(&mut self, path: &str) -> Result<()> {
        let mut dir = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            dir.push('/');
            dir.push_str(part);
            if self.dirs.insert(dir.clone()) {
                self.entry(&dir.clone(), 0o040_755, &[])?;
            }
        }
        Ok(())
    }

    fn bytes(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        if !self.files.insert(path.to_owned()) {
            return Ok(());
        }
        self.parents(path)?;
        self.entry(path, 0o100_000 | perm, data)
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if !self.files.insert(path.to_owned()) {
            return Ok(());
        }
        self.parents(path)?;
        self.entry(path, 0o120_777, target.as_bytes())
    }

    /// Copies a host file (following symlinks) to `path` in the guest.
    fn file_from_host(&mut self, path: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
        let perm = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.bytes(path, perm, &data)
    }

    /// A workspace binary without its debug info (a tenth of the size, the same code).
    fn stripped_binary(&mut self, host: &Path) -> Result<()> {
        let tmp = std::env::temp_dir().join(format!(
            "sluice-vm-strip-{}-{}",
            std::process::id(),
            self.ino
        ));
        setup::run_quiet(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(host)
                .arg(&tmp),
        )?;
        let result = self.file_from_host(host.to_str().context("path")?, &tmp);
        let _ = fs::remove_file(&tmp);
        result
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back: (name, mode, data) per entry, checking the format's rules.
    fn parse_newc(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let field = |at: usize, i: usize| {
            let hex = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
            usize::from_str_radix(hex, 16).unwrap()
        };
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at {at}");
            let (mode, size, namesize) = (field(at, 1) as u32, field(at, 6), field(at, 11));
            let name_at = at + 110;
            let name = std::str::from_utf8(&bytes[name_at..name_at + namesize - 1]).unwrap();
            assert_eq!(bytes[name_at + namesize - 1], 0, "names are NUL terminated");
            let data_at = (name_at + namesize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return entries;
            }
            entries.push((name.to_owned(), mode, data));
        }
    }

    #[test]
    fn cpio_archives_follow_the_newc_format() {
        let path = std::env::temp_dir().join(format!("sluice-cpio-test-{}", std::process::id()));
        let mut cpio = Cpio::create(&path).unwrap();
        cpio.bytes("/init", 0o755, b"#!/bin/sh\n").unwrap();
        cpio.bytes("/usr/lib/x/libfoo.so", 0o644, b"12345").unwrap();
        cpio.bytes("/usr/lib/x/libfoo.so", 0o644, b"again").unwrap();
        cpio.symlink("/sbin/modprobe", "/bin/busybox").unwrap();
        cpio.finish().unwrap();
        let entries = parse_newc(&std::fs::read(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "usr",
                "usr/lib",
                "usr/lib/x",
                "usr/lib/x/libfoo.so",
                "sbin",
                "sbin/modprobe"
            ],
            "parents come before children, each once, and a path is written once"
        );
        assert_eq!(entries[0].1, 0o100_755);
        assert_eq!(entries[1].1, 0o040_755);
        assert_eq!(entries[4].2, b"12345");
        assert_eq!(
            (entries[6].1, entries[6].2.as_slice()),
            (0o120_777, &b"/bin/busybox"[..])
        );
    }

    #[test]
    fn ldd_output_gives_every_library_file() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn console_lines_decide_the_outcome() {
        let mut o = Outcome::new();
        for line in [
            "[    2.1] random kernel chatter",
            "sluice-vm: check-kernel=0",
            "test ebpf::a ... ok",
            "test ebpf::b ... FAILED",
            "test result: FAILED. 20 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "sluice-vm: exit=101",
        ] {
            o.observe(line);
        }
        assert_eq!(
            (o.passed, o.failed, o.exit, o.check_kernel),
            (20, 1, Some(101), Some(0))
        );
        assert_eq!(o.failures, ["ebpf::b"]);
        assert!(!o.ok());
        assert!(o.reason().contains("ebpf::b"), "{}", o.reason());

        let mut quiet = Outcome::new();
        quiet.observe("sluice-vm: check-kernel=1");
        assert!(
            !quiet.ok(),
            "a guest that never reports an exit status has failed"
        );
        assert!(
            quiet.reason().contains("--check-kernel"),
            "{}",
            quiet.reason()
        );

        let mut good = Outcome::new();
        for line in [
            "sluice-vm: check-kernel=0",
            "test result: ok. 22 passed; 0 failed;",
            "sluice-vm: exit=0",
        ] {
            good.observe(line);
        }
        assert!(good.ok());
    }

    #[test]
    fn every_kernel_source_names_its_keyring() {
        for spec in KERNELS {
            assert!(
                spec.sources.contains("Signed-By: {keyring}"),
                "{} is unsigned",
                spec.name
            );
        }
        assert!(KERNELS.iter().any(|k| k.name == OLDEST));
    }
}
