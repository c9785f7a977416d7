//! What this node's kernel can do for sluice, checked rather than assumed from a version number
//! (distributions backport BPF features, and a version says nothing about the build's config).
//!
//! [`check`] loads every program of the object on its own, so one rejected program does not
//! hide the verdict on the others, and keeps the verifier's log of each rejection.

use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};

use crate::ebpf::OBJECT;

/// The oldest kernel line sluice supports (verified by `cargo xtask vm-test`). Older kernels
/// lack sk_lookup (5.9), BPF links for netns attachments (5.8) and LINK_DETACH (5.9).
pub const FLOOR: (u32, u32) = (5, 10);

/// One thing sluice needs from the kernel.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    /// Why it failed (a verifier log for a rejected program), or what was found.
    pub detail: String,
}

/// Every check, in the order they are worth reading.
pub fn check() -> Vec<Check> {
    let mut checks = Vec::new();
    let release = release();
    checks.push(Check {
        what: format!("Linux {}.{} or newer", FLOOR.0, FLOOR.1),
        ok: supported(),
        detail: if release.is_empty() {
            "cannot read /proc/sys/kernel/osrelease".to_owned()
        } else {
            release.clone()
        },
    });
    let cgroup = crate::cgroup::v2_root();
    checks.push(Check {
        what: "cgroup v2 mounted".to_owned(),
        ok: cgroup.is_ok(),
        detail: match cgroup {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("{e}; outbound capture attaches to the pod's cgroup v2 directory"),
        },
    });
    checks.push(preserve_source());
    crate::sys::raise_memlock_limit();
    // The maps are declared pinned by name; give them a scratch directory so a check never
    // touches a live pin root.
    let scratch =
        std::path::PathBuf::from(format!("/sys/fs/bpf/sluice-check-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        checks.push(Check {
            what: "bpffs mounted".to_owned(),
            ok: false,
            detail: format!(
                "create {}: {e}; mount it with `mount -t bpf bpf /sys/fs/bpf`",
                scratch.display()
            ),
        });
        return checks;
    }
    checks.push(Check {
        what: "bpffs mounted".to_owned(),
        ok: true,
        detail: "/sys/fs/bpf".to_owned(),
    });
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&scratch)
        .load(OBJECT);
    match loaded {
        Err(e) => checks.push(Check {
            what: "load the eBPF object (maps, BTF)".to_owned(),
            ok: false,
            detail: e.to_string(),
        }),
        Ok(mut ebpf) => {
            let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
            names.sort();
            for name in names {
                let result = load_one(&mut ebpf, &name);
                checks.push(Check {
                    what: format!("the verifier accepts {name}"),
                    ok: result.is_ok(),
                    detail: result.err().unwrap_or_default(),
                });
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    checks
}

/// Whether the proxy can dial apps from the client's address (`--preserve-source`, on by
/// default): transparent sockets, and, for the app's replies under eBPF capture, the mark
/// sysctls (policy routing is checked at each pod's capture, which fails naming it).
fn preserve_source() -> Check {
    let what = "the app can see the client's address (--preserve-source)".to_owned();
    let mut missing = Vec::new();
    match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(socket) => {
            let one: libc::c_int = 1;
            // SAFETY: a valid fd and a c_int option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::SOL_IP,
                    libc::IP_TRANSPARENT,
                    std::ptr::from_ref(&one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                missing.push(format!(
                    "IP_TRANSPARENT: {} (needs CAP_NET_ADMIN)",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Err(e) => missing.push(format!("open a socket: {e}")),
    }
    for sysctl in [
        "ipv4/tcp_fwmark_accept",
        "ipv4/fwmark_reflect",
        "ipv6/fwmark_reflect",
    ] {
        if !std::path::Path::new("/proc/sys/net").join(sysctl).exists() {
            missing.push(format!("net.{} is missing", sysctl.replace('/', ".")));
        }
    }
    Check {
        what,
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "transparent sockets, fwmark sysctls".to_owned()
        } else {
            format!(
                "{}; run the proxy with --preserve-source=false (apps then see the pod's own address)",
                missing.join("; ")
            )
        },
    }
}

fn load_one(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    let Some(prog) = ebpf.program_mut(name) else {
        return Err("not in the object".to_owned());
    };
    let loaded = match prog {
        Program::SkLookup(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        _ => return Err("unexpected program type".to_owned()),
    };
    loaded.map_err(|e| {
        // aya's Display has the verifier log inline; the chain below it says which syscall.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })
}

/// The running kernel's release string (`uname -r`), or "" if it cannot be read.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether the running kernel is at or above [`FLOOR`] (true when the release cannot be read:
/// the loads that follow then fail with the kernel's own error).
pub fn supported() -> bool {
    meets_floor(&release())
}

fn meets_floor(release: &str) -> bool {
    parse_release(release).is_none_or(|v| v >= FLOOR)
}

/// The running kernel's (major, minor).
pub fn version() -> Option<(u32, u32)> {
    parse_release(&release())
}

/// `5.10.0-46-cloud-amd64` → (5, 10).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::{meets_floor, parse_release};

    #[test]
    fn the_floor_is_5_10() {
        assert!(!meets_floor("4.19.0-27-amd64"));
        assert!(!meets_floor("5.4.0-216-generic"));
        assert!(!meets_floor("5.9.16"));
        assert!(meets_floor("5.10.0-46-cloud-amd64"));
        assert!(meets_floor("6.1.0-56-cloud-amd64"));
        assert!(
            meets_floor(""),
            "unreadable: let the kernel's own errors speak"
        );
    }

    #[test]
    fn reads_distribution_release_strings() {
        assert_eq!(parse_release("5.10.0-46-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_release("5.15.0-161-generic"), Some((5, 15)));
        assert_eq!(parse_release("6.18.2"), Some((6, 18)));
        assert_eq!(parse_release("garbage"), None);
    }
}
