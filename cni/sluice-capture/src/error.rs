use std::path::PathBuf;

/// What went wrong while capturing or releasing a pod, naming the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid pod uid {uid:?}: {why}")]
    InvalidUid { uid: String, why: &'static str },

    #[error("open network namespace {path}: {source}; is the pod still running?")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("open cgroup {path}: {source}; check the path under the cgroup v2 mount")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{what} in netns {netns}: {source}")]
    InNetns {
        what: &'static str,
        netns: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "load the eBPF object: {0}; needs root (CAP_BPF + CAP_NET_ADMIN) and a kernel with BTF"
    )]
    Load(#[from] aya::EbpfError),

    #[error("load program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },

    #[error("attach {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: PathBuf,
        source: std::io::Error,
    },

    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },

    #[error("pin {path}: {source}; is bpffs mounted at /sys/fs/bpf?")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{command} in netns {netns} failed: {stderr}")]
    Command {
        command: String,
        netns: PathBuf,
        stderr: String,
    },

    #[error("{feature} needs Linux {since} or newer; this kernel is {kernel}")]
    Unsupported {
        feature: &'static str,
        since: &'static str,
        kernel: String,
    },

    #[error("pod {uid} has {count} {what}, more than the {max} sluice supports per pod")]
    TooMany {
        uid: String,
        what: &'static str,
        count: usize,
        max: usize,
    },

    #[error(
        "pod {uid} has no addresses to capture; give the addresses the node assigned it (the \
         CNI result, or the pod's status), never ones read from inside the pod"
    )]
    NoAddresses { uid: String },

    #[error(
        "pod {uid} claims {addr}, which pod {owner} owns; refused (an address has one owner; if \
         {owner} is gone, its capture must be released first)"
    )]
    AddressOwned {
        uid: String,
        addr: std::net::IpAddr,
        owner: String,
    },

    #[error(
        "pin root {root} holds capture state from an earlier sluice (no {layout} marker); its \
         programs and maps are not the ones this version uses. Release the pods it captured \
         (drain the node), then remove {root} (removing the pins detaches the programs) and \
         start again"
    )]
    PinLayout { root: PathBuf, layout: &'static str },

    #[error(
        "the node probe programs on cgroup {cgroup} did not see the agent's own socket, so they cannot tell the node's netns; run the agent inside that cgroup's subtree (the default, the cgroup v2 root, holds every process) or point --node-cgroup at a cgroup that holds it"
    )]
    NodeNetns { cgroup: PathBuf },
}
