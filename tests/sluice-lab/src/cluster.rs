//! A two-node cluster in network namespaces, for the mesh tests: each node is a netns with a
//! bridge its pods hang off (`10.99.<node+1>.0/24` and `fd00:99:<node+1>::/64`: every pod is
//! dual-stack), the two nodes are joined by one veth link (`10.98.0.1` ↔ `10.98.0.2`,
//! `fd00:98::1` ↔ `fd00:98::2`, routed), and each node runs its own capture (eBPF or iptables,
//! its own pin root) and its own `sluice-proxy` serving that node's enrolled pods, with one CA
//! and one mesh file shared by both.
//!
//! ```text
//!  pod netns ─┐                                        ┌─ pod netns
//!  pod netns ─┤ br0  node-a ══ inter-node link ══ node-b  br0 ├─ pod netns
//!             (proxy A: host netns, sockets in A's pods)  (proxy B)
//! ```
//!
//! Everything is removed on drop: proxies, capture, cgroups, namespaces, the CA directory.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use sluice_capture::ebpf::EbpfCapture;
use sluice_capture::iptables::IptablesCapture;
use sluice_capture::netns::Netns;
use sluice_capture::{Backend, PodCapture, PodUid, Redirector};

use crate::app::{Placement, sibling_binary};
use crate::lab::{CgroupGuard, DirGuard, NetnsGuard, PinRootGuard, run, unique_id};
use crate::proxy::ProxyProcess;

/// A pod to create.
#[derive(Clone, Copy, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    /// 0 or 1.
    pub node: usize,
    /// The last octet of its address on its node's subnet.
    pub host: u8,
    /// An HBONE workload in the mesh file (false: listed as `protocol: TCP`, not enrolled).
    pub meshed: bool,
}

impl PodSpec {
    pub const fn new(name: &'static str, node: usize, host: u8, meshed: bool) -> Self {
        Self {
            name,
            node,
            host,
            meshed,
        }
    }
}

/// A meshed client pod on node 0 and a meshed server pod on node 1: the benchmark's pair, and
/// the smallest cluster that crosses the link between nodes.
pub const CLIENT_AND_SERVER: [PodSpec; 2] = [
    PodSpec {
        name: "client",
        node: 0,
        host: 2,
        meshed: true,
    },
    PodSpec {
        name: "server",
        node: 1,
        host: 2,
        meshed: true,
    },
];

/// A service in the mesh file: `vip:port` load-balanced over `endpoints`' `target_port`.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSpec {
    pub hostname: &'static str,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: &'static [&'static str],
}

pub struct ClusterPod {
    pub name: &'static str,
    pub uid: PodUid,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub node: usize,
    pub meshed: bool,
    capture: PodCapture,
    // Drop order: the cgroup (once its processes are gone), then the netns.
    pub cgroup: CgroupGuard,
    pub ns: NetnsGuard,
}

impl ClusterPod {
    /// A process of the pod (its netns and cgroup: outbound capture applies to it).
    pub fn place(&self) -> Placement {
        Placement {
            netns: self.ns.path(),
            cgroup: Some(self.cgroup.path.clone()),
        }
    }

    /// A server process of the pod (its netns; servers need no outbound capture).
    pub fn place_server(&self) -> Placement {
        Placement {
            netns: self.ns.path(),
            cgroup: None,
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6, port))
    }
}

/// Field order is drop order.
pub struct Cluster {
    pub proxies: Vec<ProxyProcess>,
    captures: Vec<Box<dyn Redirector>>,
    pins: Vec<PinRootGuard>,
    pub pods: Vec<ClusterPod>,
    proxy_cgroups: Vec<CgroupGuard>,
    /// Each node's own processes (kubelet's probes), below which the node probe programs sit.
    node_cgroups: Vec<CgroupGuard>,
    nodes: Vec<NetnsGuard>,
    dir: DirGuard,
    pub id: String,
    /// The capture backend (meaningless for [`Cluster::unmeshed`]).
    pub backend: Backend,
    services: Vec<ServiceSpec>,
    /// The mesh file's `policies:` list, as YAML.
    policies: String,
    /// Whether enrolled pods are HBONE workloads (false: captured, but listed as `TCP`, so
    /// both proxies pass their traffic through: capture's cost without the mesh's).
    hbone: bool,
}

/// The inter-node link's address on node 0 and node 1.
const LINK: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 98, 0, 1), Ipv4Addr::new(10, 98, 0, 2)];

fn subnet_ip(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, node as u8 + 1, host)
}

fn subnet_ip6(node: usize, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, node as u16 + 1, 0, 0, 0, 0, u16::from(host))
}

fn link_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, node as u16 + 1)
}

impl Cluster {
    /// The cluster with each node's capture and proxy running.
    pub fn new(backend: Backend, pods: &[PodSpec], services: &[ServiceSpec]) -> Result<Self> {
        Self::build(Some(backend), pods, services, &[])
    }

    /// The cluster with the `meshed` pods captured and served by their node's proxy in L4
    /// passthrough (listed as `TCP` workloads): what capture costs without HBONE.
    pub fn passthrough(backend: Backend, pods: &[PodSpec]) -> Result<Self> {
        Self::build_with(Some(backend), pods, &[], &[], false)
    }

    /// As [`Cluster::new`], with extra arguments for both proxies (e.g. `--drain-timeout 5s`).
    pub fn with_proxy_args(
        backend: Backend,
        pods: &[PodSpec],
        services: &[ServiceSpec],
        proxy_args: &[&str],
    ) -> Result<Self> {
        Self::build(Some(backend), pods, services, proxy_args)
    }

    /// The same topology with no capture and no proxy: the `direct` baseline of benchmarks.
    pub fn unmeshed(pods: &[PodSpec]) -> Result<Self> {
        Self::build(None, pods, &[], &[])
    }

    fn build(
        backend: Option<Backend>,
        pods: &[PodSpec],
        services: &[ServiceSpec],
        proxy_args: &[&str],
    ) -> Result<Self> {
        Self::build_with(backend, pods, services, proxy_args, true)
    }

    fn build_with(
        backend: Option<Backend>,
        pods: &[PodSpec],
        services: &[ServiceSpec],
        proxy_args: &[&str],
        hbone: bool,
    ) -> Result<Self> {
        let id = unique_id();
        let dir = DirGuard::new(&format!("sluice-cluster-{id}"))?;
        let mut nodes = Vec::new();
        for n in 0..2 {
            let node = NetnsGuard::new(format!("sluice-{id}-n{n}"))?;
            node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            node.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            node.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
            let gateway = format!("{}/24", subnet_ip(n, 1));
            node.exec(&["ip", "addr", "add", &gateway, "dev", "br0"])?;
            // nodad: usable at once, no duplicate-address wait.
            let gateway6 = format!("{}/64", subnet_ip6(n, 1));
            node.exec(&["ip", "-6", "addr", "add", &gateway6, "dev", "br0", "nodad"])?;
            node.exec(&["ip", "link", "set", "br0", "up"])?;
            nodes.push(node);
        }
        let link = [format!("sl{id}x0"), format!("sl{id}x1")];
        run(Command::new("ip").args([
            "link",
            "add",
            &link[0],
            "netns",
            &nodes[0].name,
            "type",
            "veth",
            "peer",
            "name",
            &link[1],
            "netns",
            &nodes[1].name,
        ]))?;
        for n in 0..2 {
            let other = 1 - n;
            nodes[n].exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/30", LINK[n]),
                "dev",
                &link[n],
            ])?;
            let link6 = format!("{}/64", link_ip6(n));
            nodes[n].exec(&["ip", "-6", "addr", "add", &link6, "dev", &link[n], "nodad"])?;
            nodes[n].exec(&["ip", "link", "set", &link[n], "up"])?;
            let route6 = format!("fd00:99:{}::/64", other + 1);
            let via6 = link_ip6(other).to_string();
            nodes[n].exec(&["ip", "-6", "route", "add", &route6, "via", &via6])?;
            let route = format!("10.99.{}.0/24", other + 1);
            nodes[n].exec(&[
                "ip",
                "route",
                "add",
                &route,
                "via",
                &LINK[other].to_string(),
            ])?;
        }

        let mut cluster_pods = Vec::new();
        for (k, spec) in pods.iter().enumerate() {
            let ns = NetnsGuard::new(format!("sluice-{id}-{}", spec.name))?;
            let (inside, outside) = (format!("sl{id}p{k}"), format!("sl{id}h{k}"));
            let node = &nodes[spec.node];
            run(Command::new("ip").args([
                "link", "add", &inside, "netns", &ns.name, "type", "veth", "peer", "name",
                &outside, "netns", &node.name,
            ]))?;
            node.exec(&["ip", "link", "set", &outside, "master", "br0", "up"])?;
            let ip = subnet_ip(spec.node, spec.host);
            ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inside])?;
            ns.exec(&["ip", "link", "set", &inside, "up"])?;
            let gateway = subnet_ip(spec.node, 1).to_string();
            ns.exec(&["ip", "route", "add", "default", "via", &gateway])?;
            let ip6 = subnet_ip6(spec.node, spec.host);
            let cidr6 = format!("{ip6}/64");
            ns.exec(&["ip", "-6", "addr", "add", &cidr6, "dev", &inside, "nodad"])?;
            let gateway6 = subnet_ip6(spec.node, 1).to_string();
            ns.exec(&["ip", "-6", "route", "add", "default", "via", &gateway6])?;
            // The node ties each pod address to that pod's interface, as a real CNI does
            // (static neighbours here): a pod that claims a neighbour's address cannot take
            // its traffic by answering or sending neighbour discovery for it.
            let link = ns.output(&["ip", "-o", "link", "show", "dev", &inside])?;
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .with_context(|| format!("no MAC address in {link:?}"))?
                .to_owned();
            let mac = mac.as_str();
            for addr in [ip.to_string(), ip6.to_string()] {
                node.exec(&[
                    "ip",
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    mac,
                    "dev",
                    "br0",
                    "nud",
                    "permanent",
                ])?;
            }
            let cgroup = CgroupGuard::new(&format!("sluice-{id}-{}", spec.name))?;
            let uid = PodUid::parse(&format!("{}-{id}", spec.name))?;
            let mut capture = PodCapture::new(uid.clone(), ns.path());
            capture.cgroup = Some(cgroup.path.clone());
            // The addresses the node assigned, as the CNI result would say.
            capture.addrs = vec![ip.into(), ip6.into()];
            cluster_pods.push(ClusterPod {
                name: spec.name,
                uid,
                ip,
                ip6,
                node: spec.node,
                meshed: spec.meshed,
                capture,
                cgroup,
                ns,
            });
        }

        let mut cluster = Self {
            proxies: Vec::new(),
            captures: Vec::new(),
            pins: Vec::new(),
            pods: cluster_pods,
            proxy_cgroups: Vec::new(),
            node_cgroups: Vec::new(),
            nodes,
            dir,
            id,
            backend: backend.unwrap_or(Backend::Ebpf),
            services: services.to_vec(),
            policies: String::new(),
            hbone,
        };
        cluster.write_mesh()?;
        if backend.is_some() {
            cluster.init_ca()?;
            for n in 0..2 {
                cluster.start_node(n, proxy_args)?;
            }
        }
        Ok(cluster)
    }

    pub fn pod(&self, name: &str) -> &ClusterPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this cluster"))
    }

    /// The pod's interface inside its netns (its end of the veth to the node's bridge).
    pub fn pod_interface(&self, name: &str) -> String {
        let k = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this cluster"));
        format!("sl{}p{k}", self.id)
    }

    /// Node `n`'s eBPF pin root (its verdict counters and pinned pods).
    pub fn pin_root(&self, n: usize) -> PathBuf {
        Path::new("/sys/fs/bpf").join(format!("sluice-lab-{}-n{n}", self.id))
    }

    /// Enrols the meshed pod `name` again on its node's capture, with `change` applied to what
    /// it is captured with (as an agent capturing it again would). The spec is kept only if the
    /// enrolment succeeds.
    pub fn recapture(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut PodCapture),
    ) -> Result<(), sluice_capture::CaptureError> {
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this cluster"));
        let mut spec = pod.capture.clone();
        change(&mut spec);
        // Captures are started in node order, one per node.
        self.captures[pod.node].enroll(&spec)?;
        pod.capture = spec;
        Ok(())
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.dir.0.join("mesh.yaml")
    }

    /// The node's netns (where its end of the inter-node link is).
    pub fn node_ns(&self, node: usize) -> &NetnsGuard {
        &self.nodes[node]
    }

    /// Records every frame crossing the inter-node link (seen from node 0) until dropped.
    pub fn capture_link(&self) -> Result<LinkCapture> {
        LinkCapture::start(&self.nodes[0].path(), &format!("sl{}x0", self.id))
    }

    /// Replaces the mesh file's Istio policy objects (a YAML list, as `kubectl get -o yaml`
    /// items) and waits until both proxies have reloaded it.
    pub fn set_policies(&mut self, yaml: &str) -> Result<()> {
        let seen: Vec<usize> = self
            .proxies
            .iter()
            .map(|p| p.count_log(&["mesh reloaded"]))
            .collect();
        self.policies = yaml.to_owned();
        self.write_mesh()?;
        for (proxy, seen) in self.proxies.iter().zip(seen) {
            proxy.wait_for_log_lines(&["mesh reloaded"], seen + 1)?;
        }
        Ok(())
    }

    fn write_mesh(&self) -> Result<()> {
        let services = &self.services;
        let mut yaml = String::from("trustDomain: cluster.local\nworkloads:\n");
        for pod in &self.pods {
            let protocol = if pod.meshed && self.hbone {
                "HBONE"
            } else {
                "TCP"
            };
            yaml.push_str(&format!(
                "  - uid: {}\n    name: {}\n    namespace: default\n    serviceAccount: {}\n    \
                 ips: [{}, {}]\n    node: node-{}\n    protocol: {protocol}\n    labels: {{app: {}}}\n",
                pod.uid, pod.name, pod.name, pod.ip, pod.ip6, pod.node, pod.name
            ));
        }
        yaml.push_str("services:\n");
        for s in services {
            let endpoints: Vec<String> = s
                .endpoints
                .iter()
                .map(|name| self.pod(name).uid.to_string())
                .collect();
            yaml.push_str(&format!(
                "  - hostname: {}\n    vips: [{}]\n    ports: {{{}: {}}}\n    endpoints: [{}]\n",
                s.hostname,
                s.vip,
                s.port,
                s.target_port,
                endpoints.join(", ")
            ));
        }
        write_mesh_file(yaml, &self.policies, &self.mesh_file())
    }

    fn init_ca(&self) -> Result<()> {
        init_ca(&self.dir.0.join("ca"))
    }

    /// Where node `n`'s own processes run: its netns and its cgroup.
    pub fn node_placement(&self, n: usize) -> Placement {
        Placement {
            netns: self.nodes[n].path(),
            cgroup: self.node_cgroups.get(n).map(|c| c.path.clone()),
        }
    }

    /// A TCP probe as kubelet sends it, from node `n` (its netns and a node process) to `to`.
    pub fn probe(&self, n: usize, to: SocketAddr) -> Result<crate::app::Outcome> {
        crate::app::run_client(&self.node_placement(n), to, 1024)
    }

    /// An HTTP probe as kubelet sends it, from node `n` to `to`.
    pub fn http_probe(&self, n: usize, to: SocketAddr) -> Result<crate::app::HttpOutcome> {
        crate::app::run_http_get(&self.node_placement(n), to)
    }

    /// The node side of the probe exemption, as the agent sets it up: eBPF, the bind programs
    /// on the node's cgroup (attached by `sluice-load` run inside it, as the agent runs inside
    /// the cgroup v2 root); iptables, the SNAT for the node's own sockets to its captured pods.
    fn exempt_node_probes(&self, n: usize, node_cgroup: &Path) -> Result<()> {
        let node = &self.nodes[n];
        match self.backend {
            Backend::Ebpf => {
                let mut cmd = crate::app::command_in_cgroup(
                    &crate::app::sibling_binary("sluice-load")?,
                    node_cgroup,
                )?;
                cmd.arg("--pin-root")
                    .arg(self.pin_root(n))
                    .arg("--node-cgroup")
                    .arg(node_cgroup)
                    .arg("--node-netns")
                    .arg(node.path());
                run(&mut cmd).context("attach the node probe programs with sluice-load")?;
            }
            Backend::Iptables => {
                let netns = sluice_capture::netns::Netns::open(node.path())?;
                let addrs: Vec<std::net::IpAddr> = self
                    .pods
                    .iter()
                    .filter(|p| p.node == n && p.meshed)
                    .flat_map(|p| p.capture.addrs.iter().copied())
                    .collect();
                sluice_capture::node::sync_probe_snat(&netns, &addrs)?;
            }
        }
        Ok(())
    }

    /// Captures the node's meshed pods and starts its proxy for them.
    fn start_node(&mut self, n: usize, proxy_args: &[&str]) -> Result<()> {
        let node_cgroup = CgroupGuard::new(&format!("sluice-{}-node{n}", self.id))?;
        let proxy_cgroup = CgroupGuard::new(&format!("sluice-{}-proxy{n}", self.id))?;
        let pin_root = self.pin_root(n);
        let mut capture: Box<dyn Redirector> = match self.backend {
            Backend::Ebpf => {
                self.pins.push(PinRootGuard {
                    path: pin_root.clone(),
                });
                let mut capture = EbpfCapture::load(&pin_root)?;
                capture.attach_proxy(&proxy_cgroup.path)?;
                Box::new(capture)
            }
            Backend::Iptables => Box::new(IptablesCapture::new()),
        };
        let mut served = Vec::new();
        for pod in self.pods.iter().filter(|p| p.node == n && p.meshed) {
            capture
                .enroll(&pod.capture)
                .with_context(|| format!("enrol {}", pod.name))?;
            served.push(format!("{}={}", pod.uid, pod.ns.path().display()));
        }
        self.captures.push(capture);
        self.exempt_node_probes(n, &node_cgroup.path)?;
        self.node_cgroups.push(node_cgroup);
        let mesh = self.mesh_file();
        let ca = self.dir.0.join("ca");
        let mut extra = vec![
            "--mesh-config",
            mesh.to_str().context("mesh path")?,
            "--ca-dir",
            ca.to_str().context("ca path")?,
        ];
        extra.extend_from_slice(proxy_args);
        self.proxies.push(
            ProxyProcess::spawn(&served, &proxy_cgroup.path, &pin_root, &extra)
                .with_context(|| format!("start node {n}'s proxy"))?,
        );
        self.proxy_cgroups.push(proxy_cgroup);
        Ok(())
    }
}

/// Appends the `policies:` list (YAML list items, as `kubectl get -o yaml` gives them) to the
/// mesh file text `yaml` and writes it to `path` whole: written aside and renamed into place, so
/// a proxy's reload never sees half a file.
pub fn write_mesh_file(mut yaml: String, policies: &str, path: &Path) -> Result<()> {
    if !policies.trim().is_empty() {
        yaml.push_str("policies:\n");
        for line in policies.lines() {
            yaml.push_str(&format!("  {line}\n"));
        }
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml).context("write the mesh file")?;
    std::fs::rename(&tmp, path).context("replace the mesh file")
}

/// Creates a mesh CA in `dir` with the real proxy binary (`sluice-proxy --init-ca`).
pub(crate) fn init_ca(dir: &Path) -> Result<()> {
    let out = Command::new(sibling_binary("sluice-proxy")?)
        .arg("--init-ca")
        .arg("--ca-dir")
        .arg(dir)
        .output()
        .context("run sluice-proxy --init-ca")?;
    if !out.status.success() {
        bail!(
            "sluice-proxy --init-ca failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Every frame on one interface, read with an `AF_PACKET` socket (no tcpdump needed), kept in
/// memory (bounded) until the capture is dropped.
pub struct LinkCapture {
    stop: Arc<AtomicBool>,
    bytes: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Enough for the tests' transfers; beyond it frames are counted but not kept.
const CAPTURE_LIMIT: usize = 256 * 1024 * 1024;

impl LinkCapture {
    pub(crate) fn start(netns: &Path, ifname: &str) -> Result<Self> {
        let ns = Netns::open(netns).context("open the node netns")?;
        let ifname_c = std::ffi::CString::new(ifname)?;
        let socket = ns.run(|| -> std::io::Result<OwnedFd> {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the fd is owned right after.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh socket nothing else owns.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name; the index is looked up in this (the node's) netns.
            let index = unsafe { libc::if_nametoindex(ifname_c.as_ptr()) };
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            // SAFETY: addr is a valid sockaddr_ll of the size given.
            let ret = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: a valid timeval for SO_RCVTIMEO.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (stop_flag, sink) = (stop.clone(), bytes.clone());
        let thread = std::thread::spawn(move || {
            let mut frame = vec![0u8; 65536];
            while !stop_flag.load(Ordering::Relaxed) {
                // SAFETY: frame is a valid buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if n <= 0 {
                    continue; // timeout: check the stop flag
                }
                if let Ok(mut all) = sink.lock()
                    && all.len() < CAPTURE_LIMIT
                {
                    all.extend_from_slice(&frame[..n as usize]);
                }
            }
        });
        Ok(Self {
            stop,
            bytes,
            thread: Some(thread),
        })
    }

    /// How many bytes of frames have been seen.
    pub fn len(&self) -> usize {
        self.bytes.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `needle` appears anywhere in the captured frames.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.bytes
            .lock()
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
