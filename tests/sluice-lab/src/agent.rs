//! A node run the way a cluster runs it: the real `sluice-cni-agent` (standalone mode, its pods
//! file written by the test), the real `sluice-proxy` connected to it over ZDS, and pods started
//! the way a container runtime starts them, through the CNI chain of the node's primary conflist
//! (`bridge` + `host-local` from Debian's containernetworking-plugins, then `sluice-cni`, which
//! the agent inserted itself).
//!
//! The lab plays kubelet and the runtime: it lays out pod cgroups as kubelet does for the chosen
//! cgroup driver, creates the sandbox netns, runs the plugins with the CNI environment, then
//! starts the sandbox's "pause" process. Everything is removed on drop.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sluice_capture::Backend;
use sluice_capture::ebpf;

use crate::WAIT;
use crate::app::{Outcome, Placement, ProcessGuard, command_in, sibling_binary};
use crate::daemon::Daemon;
use crate::lab::{CgroupGuard, DirGuard, NetnsGuard, PinRootGuard, unique_id};
use crate::proxy::ProxyProcess;

/// Where Debian's containernetworking-plugins puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The node's pod subnet (each lab has its own node netns, so labs can share it).
const POD_SUBNET: &str = "10.97.0.0/24";

/// How kubelet names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

/// A CNI error as the runtime saw it.
#[derive(Clone, Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {}: {}",
            self.plugin, self.code, self.msg, self.details
        )
    }
}

/// Which container runtime the lab plays, as far as the CNI chain sees it: what it passes in
/// `CNI_ARGS` (and `CNI_NETNS` on DEL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// containerd or CRI-O under kubelet: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_INFRA_CONTAINER_ID` and `K8S_POD_UID`.
    Kubelet,
    /// podman with its CNI backend: `K8S_POD_NAME` only (the container's name).
    Podman,
    /// No arguments at all, and on DEL no `CNI_NETNS` either (the spec allows it there).
    Bare,
}

/// A pod sandbox started through the CNI chain.
pub struct SandboxPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    container_id: String,
    /// The chain's ADD result, handed back on CHECK and DEL as runtimes do.
    result: Value,
    /// How long the chain's ADD took (what sandbox start waits for).
    pub add_time: Duration,
    pause: Option<ProcessGuard>,
    /// The app container's cgroup (below the pod's).
    pub app_cgroup: PathBuf,
    pub pod_cgroup: PathBuf,
    pub ns: NetnsGuard,
}

impl SandboxPod {
    /// A process in the pod's app container.
    pub fn place(&self) -> Placement {
        Placement {
            netns: self.ns.path(),
            cgroup: Some(self.app_cgroup.clone()),
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// An in-memory API server served over HTTP to the agent, on its own runtime.
struct KubeFixture {
    api: sluice_kube_fake::FakeApi,
    kubeconfig: PathBuf,
    _runtime: tokio::runtime::Runtime,
}

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
/// The node's name in Kubernetes mode.
pub const NODE_NAME: &str = "lab-node";

/// Field order is drop order: daemons, pods, capture pins, cgroups, the node, files.
pub struct AgentLab {
    pub agent: Option<Daemon>,
    pub proxy: Option<ProxyProcess>,
    /// Kubernetes mode: the API server the agent watches (outlives the agent).
    kube: Option<KubeFixture>,
    pub pods: Vec<SandboxPod>,
    /// Processes in pod cgroups that are not in a sandbox netns (see `start_pod_in_node_netns`).
    strays: Vec<ProcessGuard>,
    // Held for its drop: the eBPF pins go after the pods, before the cgroups.
    _pins: Option<PinRootGuard>,
    proxy_cgroup: CgroupGuard,
    kubepods: CgroupGuard,
    /// The node's own processes (the agent, and kubelet's probes): the agent's
    /// `--node-cgroup`, as the cgroup v2 root is on a real node.
    node_cgroup: CgroupGuard,
    pub node: NetnsGuard,
    dir: DirGuard,
    pub id: String,
    pub backend: Backend,
    pub driver: CgroupDriver,
    /// The pods file's content: namespaces (with labels) and pods.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    listed: Vec<Value>,
    health: Option<SocketAddr>,
    /// The node's pod subnet (host-local's range; the bridge's gateway is its `.1`).
    pub pod_subnet: String,
}

impl AgentLab {
    /// A node with its primary CNI config (bridge + host-local) and an empty pods file; neither
    /// agent nor proxy is running yet.
    pub fn new(backend: Backend, driver: CgroupDriver) -> Result<Self> {
        Self::with_subnet(backend, driver, POD_SUBNET)
    }

    /// As [`AgentLab::new`], with its own pod subnet (`10.97.1.0/24`): nodes of one cluster
    /// need distinct ones to route between them.
    pub fn with_subnet(backend: Backend, driver: CgroupDriver, subnet: &str) -> Result<Self> {
        for plugin in ["bridge", "host-local"] {
            let path = Path::new(REFERENCE_PLUGINS).join(plugin);
            if !path.exists() {
                bail!(
                    "{} is missing: install Debian's containernetworking-plugins (cargo xtask test does)",
                    path.display()
                );
            }
        }
        let id = unique_id();
        let dir = DirGuard::new(&format!("sluice-agent-{id}"))?;
        for sub in ["net.d", "bin", "state", "ipam"] {
            std::fs::create_dir_all(dir.0.join(sub))?;
        }
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": "lab-pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.0.join("ipam"),
                }
            }]
        });
        std::fs::write(dir.0.join("net.d/10-lab.conflist"), primary.to_string())?;
        let node = NetnsGuard::new(format!("sluice-{id}-node"))?;
        let kubepods = CgroupGuard::new(&match driver {
            CgroupDriver::Cgroupfs => format!("sluice-{id}-kubepods"),
            CgroupDriver::Systemd => format!("sluice-{id}-kubepods.slice"),
        })?;
        let proxy_cgroup = CgroupGuard::new(&format!("sluice-{id}-proxy"))?;
        let node_cgroup = CgroupGuard::new(&format!("sluice-{id}-node"))?;
        let pins = (backend == Backend::Ebpf).then(|| PinRootGuard {
            path: PathBuf::from(format!("/sys/fs/bpf/sluice-lab-{id}")),
        });
        let lab = Self {
            agent: None,
            proxy: None,
            kube: None,
            pods: Vec::new(),
            strays: Vec::new(),
            _pins: pins,
            proxy_cgroup,
            kubepods,
            node_cgroup,
            node,
            dir,
            id,
            backend,
            driver,
            namespaces: BTreeMap::new(),
            listed: Vec::new(),
            health: None,
            pod_subnet: subnet.to_owned(),
        };
        lab.write_pods_file()?;
        Ok(lab)
    }

    /// As [`AgentLab::new`], in Kubernetes mode: namespaces and pods live in an API server
    /// (`sluice-kube-fake` over HTTP) that the agent watches through a kubeconfig.
    pub fn new_kube(backend: Backend, driver: CgroupDriver) -> Result<Self> {
        let mut lab = Self::new(backend, driver)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let api = sluice_kube_fake::FakeApi::with_collections(&[NAMESPACES, PODS]);
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let _guard = runtime.enter();
        api.serve_http(listener);
        let kubeconfig = lab.path("kubeconfig");
        std::fs::write(&kubeconfig, sluice_kube_fake::kubeconfig(addr))?;
        lab.kube = Some(KubeFixture {
            api,
            kubeconfig,
            _runtime: runtime,
        });
        Ok(lab)
    }

    /// Kubernetes mode: a pod's annotation as the API server has it now.
    pub fn pod_annotation(&self, name: &str, key: &str) -> Result<Option<String>> {
        let kube = self.kube.as_ref().context("not in Kubernetes mode")?;
        let pod = self.listed_pod(name)?;
        let object = kube
            .api
            .object(PODS, pod["namespace"].as_str().unwrap_or_default(), name)
            .context("the pod is not in the API server")?;
        Ok(object["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned))
    }

    fn listed_pod(&self, name: &str) -> Result<&Value> {
        self.listed
            .iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("pod {name} is not listed"))
    }

    pub fn pin_root(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/sluice-lab-{}", self.id))
    }

    /// A file in the node's directory (`pods.yaml`, `net.d`, `zds/zds.sock`, …).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// The hand-off socket, in a directory of its own that the agent creates 0700 (the node's
    /// directory is readable by all, which the agent refuses for the socket).
    pub fn zds_socket(&self) -> PathBuf {
        self.path("zds").join("zds.sock")
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.path("net.d")
    }

    /// Where the node's own processes run: its netns and its cgroup (kubelet's probes).
    pub fn node_placement(&self) -> Placement {
        Placement {
            netns: self.node.path(),
            cgroup: Some(self.node_cgroup.path.clone()),
        }
    }

    /// A TCP probe as kubelet sends it: from the node's netns and a node process, to `addr`;
    /// what the app saw is in `server_saw`.
    pub fn probe(&self, addr: SocketAddr) -> Result<Outcome> {
        crate::app::run_client(&self.node_placement(), addr, 1024)
    }

    /// An HTTP probe as kubelet sends it (`GET /healthz`), to an app serving HTTP
    /// ([`crate::app::spawn_http_server`]); returns the status code.
    pub fn http_probe(&self, addr: SocketAddr) -> Result<crate::app::HttpOutcome> {
        crate::app::run_http_get(&self.node_placement(), addr)
    }

    /// Starts the agent and waits for its "started" line.
    pub fn start_agent(&mut self) -> Result<()> {
        // The agent runs in the node's cgroup as on a real node (every process is below the
        // cgroup v2 root); its probe programs learn the node's netns from its own socket.
        let mut cmd = crate::app::command_in_cgroup(
            &sibling_binary("sluice-cni-agent")?,
            &self.node_cgroup.path,
        )?;
        match &self.kube {
            Some(kube) => {
                cmd.args(["--node-name", NODE_NAME])
                    .env("KUBECONFIG", &kube.kubeconfig);
            }
            None => {
                cmd.arg("--pods-file").arg(self.path("pods.yaml"));
            }
        }
        cmd.args(["--backend", &self.backend.to_string()])
            .arg("--pin-root")
            .arg(self.pin_root())
            .arg("--zds-socket")
            .arg(self.zds_socket())
            .arg("--cni-socket")
            .arg(self.path("cni.sock"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--cni-bin-dir")
            .arg(self.path("bin"))
            .arg("--cni-conf-dir")
            .arg(self.conf_dir())
            .arg("--node-cgroup")
            .arg(&self.node_cgroup.path)
            .arg("--node-netns")
            .arg(self.node.path())
            .args(["--health-addr", "127.0.0.1:0", "--cni-wait", "8"])
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_LAB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            );
        let agent = Daemon::spawn(
            cmd,
            "sluice-cni-agent",
            "sluice-cni-agent started",
            "SLUICE_LAB_ECHO_AGENT",
        )?;
        let health = agent
            .ready_line
            .split_once("health=")
            .and_then(|(_, a)| a.parse().ok())
            .with_context(|| format!("no health address in {:?}", agent.ready_line))?;
        self.health = Some(health);
        self.agent = Some(agent);
        Ok(())
    }

    /// Starts the proxy, connected to the agent's hand-off socket.
    pub fn start_proxy(&mut self) -> Result<()> {
        self.start_proxy_with(&[])
    }

    /// As [`AgentLab::start_proxy`], with extra arguments (a mesh file and CA, for a cluster).
    pub fn start_proxy_with(&mut self, extra: &[&str]) -> Result<()> {
        let socket = self.zds_socket();
        let socket = socket.to_str().context("socket path")?;
        let mut args = vec!["--zds-socket", socket];
        args.extend_from_slice(extra);
        let proxy = ProxyProcess::spawn(&[], &self.proxy_cgroup.path, &self.pin_root(), &args)?;
        self.proxy = Some(proxy);
        Ok(())
    }

    pub fn agent(&self) -> Result<&Daemon> {
        self.agent.as_ref().context("the agent is not running")
    }

    pub fn proxy(&self) -> Result<&ProxyProcess> {
        self.proxy.as_ref().context("the proxy is not running")
    }

    /// Sets a namespace's labels in the pods file (`ambient`: istio.io/dataplane-mode=ambient).
    pub fn set_namespace(&mut self, name: &str, ambient: bool) -> Result<()> {
        let mut labels = BTreeMap::new();
        if ambient {
            labels.insert("istio.io/dataplane-mode".to_owned(), "ambient".to_owned());
        }
        self.namespaces.insert(name.to_owned(), labels);
        self.apply_pods_file()
    }

    /// Lists a pod in the pods file (as the API server would know it before it starts).
    pub fn list_pod(&mut self, name: &str, namespace: &str) -> Result<String> {
        let uid = self.uid(name);
        self.listed.push(
            json!({"uid": uid, "name": name, "namespace": namespace, "serviceAccount": name}),
        );
        self.apply_pods_file()?;
        Ok(uid)
    }

    /// Puts a started pod's address in its status (the pods file's `ips`, or `status.podIPs`).
    fn publish_ip(&mut self, name: &str, ip: Ipv4Addr) -> Result<()> {
        let Some(listed) = self.listed.iter_mut().find(|p| p["name"] == name) else {
            return Ok(()); // not in the pod list: nothing to update
        };
        listed["ips"] = json!([ip.to_string()]);
        if let Some(kube) = &self.kube {
            let namespace = listed["namespace"].as_str().unwrap_or_default().to_owned();
            if let Some(mut object) = kube.api.object(PODS, &namespace, name) {
                object["status"]["podIP"] = json!(ip.to_string());
                object["status"]["podIPs"] = json!([{"ip": ip.to_string()}]);
                kube.api.put(PODS, object);
            }
            return Ok(());
        }
        self.apply_pods_file()
    }

    /// Replaces a listed pod's addresses in the pods file (its `status.podIPs`), as a stale or
    /// wrong pod source would.
    pub fn set_listed_ips(&mut self, name: &str, ips: &[std::net::IpAddr]) -> Result<()> {
        let listed = self
            .listed
            .iter_mut()
            .find(|p| p["name"] == name)
            .with_context(|| format!("pod {name} is not listed"))?;
        listed["ips"] = json!(ips.iter().map(ToString::to_string).collect::<Vec<_>>());
        self.apply_pods_file()
    }

    /// Removes a pod from the pods file (as deleting it from the API server would).
    pub fn unlist_pod(&mut self, name: &str) -> Result<()> {
        self.listed.retain(|p| p["name"] != name);
        self.apply_pods_file()
    }

    /// The uid the lab gives pod `name`.
    pub fn pod_uid(&self, name: &str) -> String {
        self.uid(name)
    }

    fn uid(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    fn write_pods_file(&self) -> Result<()> {
        let namespaces: Vec<Value> = self
            .namespaces
            .iter()
            .map(|(name, labels)| json!({"name": name, "labels": labels}))
            .collect();
        // JSON is YAML: the agent reads it like any pods file.
        let file = json!({"namespaces": namespaces, "pods": self.listed});
        let tmp = self.path("pods.yaml.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&file)?)?;
        std::fs::rename(&tmp, self.path("pods.yaml"))?;
        Ok(())
    }

    /// Writes the pods file (or, in Kubernetes mode, the objects) and, with the agent running
    /// on the file, waits until it has read it.
    fn apply_pods_file(&self) -> Result<()> {
        if let Some(kube) = &self.kube {
            for (name, labels) in &self.namespaces {
                kube.api.put(
                    NAMESPACES,
                    json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}}),
                );
            }
            for pod in &self.listed {
                let (name, namespace) = (&pod["name"], &pod["namespace"]);
                let existing = kube.api.object(
                    PODS,
                    namespace.as_str().unwrap_or_default(),
                    name.as_str().unwrap_or_default(),
                );
                if existing.is_none() {
                    kube.api.put(
                        PODS,
                        json!({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": name, "namespace": namespace, "uid": pod["uid"],
                                            "labels": {"app": name}, "annotations": {}},
                               "spec": {"nodeName": NODE_NAME, "serviceAccountName": pod["serviceAccount"],
                                        "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]},
                               "status": {"phase": "Running"}}),
                    );
                }
            }
            return Ok(());
        }
        let seen = self
            .agent
            .as_ref()
            .map(|a| a.count_log(&["pods file changed"]));
        self.write_pods_file()?;
        if let (Some(agent), Some(seen)) = (&self.agent, seen) {
            agent.wait_for_log_lines(&["pods file changed"], seen + 1)?;
        }
        Ok(())
    }

    /// Starts a pod sandbox as kubelet and the runtime do: pod cgroup, netns, the CNI chain's
    /// ADD, then the pause process. `Ok(Err(_))` is a CNI failure (the sandbox did not start).
    pub fn start_pod(&mut self, name: &str, namespace: &str) -> Result<Result<usize, CniFailure>> {
        self.start_pod_as(name, namespace, Runtime::Kubelet)
    }

    /// As [`AgentLab::start_pod`], with the CNI arguments `runtime` passes.
    pub fn start_pod_as(
        &mut self,
        name: &str,
        namespace: &str,
        runtime: Runtime,
    ) -> Result<Result<usize, CniFailure>> {
        let ns = NetnsGuard::new(format!("sluice-{}-{name}", self.id))?;
        self.start_sandbox(name, namespace, runtime, ns)
    }

    /// Starts a pod sandbox (as [`AgentLab::start_pod_as`]) in a new netns whose inode number
    /// is `inode` if the kernel can give it: a released sandbox's number comes back for a later
    /// one once nothing holds the old namespace. The kernel hands out the lowest free number,
    /// so every miss is held until the end, filling the gaps below it. Also returns whether
    /// the number was reused (bounded tries: something may still hold the old namespace).
    pub fn start_pod_reusing_inode(
        &mut self,
        name: &str,
        namespace: &str,
        runtime: Runtime,
        inode: u64,
    ) -> Result<(Result<usize, CniFailure>, bool)> {
        let mut misses = Vec::new();
        let deadline = Instant::now() + WAIT / 2;
        let ns = loop {
            let ns = NetnsGuard::new(format!("sluice-{}-{name}-{}", self.id, misses.len()))?;
            if netns_inode(&ns.path())? == inode || Instant::now() > deadline || misses.len() > 500
            {
                break ns;
            }
            misses.push(ns);
        };
        let reused = netns_inode(&ns.path())? == inode;
        drop(misses);
        Ok((self.start_sandbox(name, namespace, runtime, ns)?, reused))
    }

    /// The sandbox's network namespace's inode number, as the kernel reports it.
    pub fn netns_inode(&self, name: &str) -> Result<u64> {
        netns_inode(&self.pod(name)?.ns.path())
    }

    /// The container id the lab's runtime gives pod `name`'s sandbox (`CNI_CONTAINERID`).
    pub fn container_id(&self, name: &str) -> String {
        format!("{}{name}", self.id)
    }

    fn start_sandbox(
        &mut self,
        name: &str,
        namespace: &str,
        runtime: Runtime,
        ns: NetnsGuard,
    ) -> Result<Result<usize, CniFailure>> {
        let uid = self.uid(name);
        let container_id = self.container_id(name);
        let (pod_cgroup, sandbox_cgroup, app_cgroup) = self.pod_cgroups(&uid, &container_id)?;
        for dir in [&sandbox_cgroup, &app_cgroup] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create cgroup {}", dir.display()))?;
        }
        let mut pod = SandboxPod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid,
            ip: Ipv4Addr::UNSPECIFIED,
            container_id,
            result: Value::Null,
            add_time: Duration::ZERO,
            pause: None,
            app_cgroup,
            pod_cgroup,
            ns,
        };
        let started = Instant::now();
        let added = self.chain("ADD", &pod, runtime)?;
        pod.add_time = started.elapsed();
        let result = match added {
            Ok(result) => result,
            Err(failure) => {
                // As containerd does: a sandbox whose network setup failed is torn down (DEL)
                // before the runtime reports the failure and kubelet retries.
                if let Err(e) = self.chain("DEL", &pod, runtime)? {
                    bail!("DEL after a failed ADD ({failure}) failed too: {e}");
                }
                return Ok(Err(failure));
            }
        };
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address in the chain's result {result}"))?;
        pod.ip = address.split('/').next().unwrap_or_default().parse()?;
        pod.result = result;
        // As kubelet does once the sandbox has its network: the pod's status gets its address.
        self.publish_ip(name, pod.ip)?;
        let place = Placement {
            netns: pod.ns.path(),
            cgroup: Some(sandbox_cgroup),
        };
        let child = command_in(Path::new("/bin/sleep"), &place)?
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()
            .context("start the pause process")?;
        pod.pause = Some(ProcessGuard {
            child,
            name: format!("pause of {name}"),
        });
        self.pods.push(pod);
        Ok(Ok(self.pods.len() - 1))
    }

    /// A pod whose process runs in the node's own network namespace though the pods source
    /// does not say hostNetwork (a misconfigured or lying source): laid out in cgroups like any
    /// pod, no sandbox netns, no CNI. The agent must refuse to capture it.
    pub fn start_pod_in_node_netns(&mut self, name: &str) -> Result<()> {
        let uid = self.uid(name);
        let container_id = self.container_id(name);
        let (_, sandbox_cgroup, _) = self.pod_cgroups(&uid, &container_id)?;
        std::fs::create_dir_all(&sandbox_cgroup)?;
        let place = Placement {
            netns: PathBuf::from("/proc/self/ns/net"),
            cgroup: Some(sandbox_cgroup),
        };
        let child = command_in(Path::new("/bin/sleep"), &place)?
            .arg("3600")
            .stdin(Stdio::null())
            .spawn()
            .context("start the stray process")?;
        self.strays.push(ProcessGuard {
            child,
            name: format!("process of {name}"),
        });
        Ok(())
    }

    /// CHECK through the chain, as a runtime does to verify a running sandbox.
    pub fn check_pod(&self, name: &str) -> Result<Result<(), CniFailure>> {
        let pod = self.pod(name)?;
        Ok(self.chain("CHECK", pod, Runtime::Kubelet)?.map(|_| ()))
    }

    /// Stops a sandbox: CNI DEL through the chain (in reverse), then the pause process.
    pub fn stop_pod(&mut self, name: &str) -> Result<Result<(), CniFailure>> {
        self.stop_pod_as(name, Runtime::Kubelet)
    }

    /// As [`AgentLab::stop_pod`], with the CNI arguments `runtime` passes.
    pub fn stop_pod_as(&mut self, name: &str, runtime: Runtime) -> Result<Result<(), CniFailure>> {
        let outcome = self.del_pod(name, runtime)?;
        self.kill_sandbox(name);
        Ok(outcome)
    }

    /// CNI DEL through the chain only: the sandbox's processes and netns stay, as when a
    /// runtime fails to stop them (see [`AgentLab::kill_sandbox`]).
    pub fn del_pod(&self, name: &str, runtime: Runtime) -> Result<Result<(), CniFailure>> {
        Ok(self.chain("DEL", self.pod(name)?, runtime)?.map(|_| ()))
    }

    /// CNI ADD through the chain again for a sandbox that is already there, as after its DEL
    /// (the spec lets a runtime ADD the same container again): same netns path, same
    /// processes; the pod's status gets the address it is given.
    pub fn readd_pod(&mut self, name: &str) -> Result<Result<(), CniFailure>> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let result = match self.chain("ADD", &self.pods[i], Runtime::Kubelet)? {
            Ok(result) => result,
            Err(failure) => return Ok(Err(failure)),
        };
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address in the chain's result {result}"))?;
        let ip = address.split('/').next().unwrap_or_default().parse()?;
        self.pods[i].ip = ip;
        self.pods[i].result = result;
        self.publish_ip(name, ip)?;
        Ok(Ok(()))
    }

    /// Kills the sandbox's processes and removes its netns, without CNI.
    pub fn kill_sandbox(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }

    pub fn pod(&self, name: &str) -> Result<&SandboxPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    /// Pod-level, sandbox and app cgroups as kubelet and containerd lay them out.
    fn pod_cgroups(&self, uid: &str, container_id: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let root = &self.kubepods.path;
        Ok(match self.driver {
            CgroupDriver::Cgroupfs => {
                let pod = root.join("besteffort").join(format!("pod{uid}"));
                (
                    pod.clone(),
                    pod.join(container_id),
                    pod.join(format!("{container_id}app")),
                )
            }
            CgroupDriver::Systemd => {
                let pod = root.join("kubepods-besteffort.slice").join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ));
                (
                    pod.clone(),
                    pod.join(format!("cri-containerd-{container_id}.scope")),
                    pod.join(format!("cri-containerd-{container_id}app.scope")),
                )
            }
        })
    }

    /// Runs the primary conflist's plugins for `command` as libcni does: each plugin gets the
    /// list's name and version and the previous result; DEL runs in reverse with the ADD result.
    fn chain(
        &self,
        command: &str,
        pod: &SandboxPod,
        runtime: Runtime,
    ) -> Result<Result<Value, CniFailure>> {
        let list = self.primary_conflist()?;
        let mut plugins: Vec<Value> = list["plugins"].as_array().context("plugins")?.clone();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut prev = (command != "ADD").then(|| pod.result.clone());
        for plugin in plugins {
            let kind = plugin["type"].as_str().context("plugin type")?.to_owned();
            let mut conf = plugin.clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["name"] = list["name"].clone();
            if let Some(prev) = &prev {
                conf["prevResult"] = prev.clone();
            }
            let out = self.exec_plugin(&kind, command, pod, runtime, &conf)?;
            match out {
                Ok(result) if command == "ADD" => prev = Some(result),
                Ok(_) => {}
                Err(failure) => return Ok(Err(failure)),
            }
        }
        Ok(Ok(prev.unwrap_or(Value::Null)))
    }

    /// The node's primary conflist (the first by name), as the runtime reads it.
    pub fn primary_conflist(&self) -> Result<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.conf_dir())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        let first = files.first().context("no conflist in the CNI config dir")?;
        Ok(serde_json::from_str(&std::fs::read_to_string(first)?)?)
    }

    /// One plugin run: found on CNI_PATH, run in the node's netns, config on stdin.
    fn exec_plugin(
        &self,
        kind: &str,
        command: &str,
        pod: &SandboxPod,
        runtime: Runtime,
        conf: &Value,
    ) -> Result<Result<Value, CniFailure>> {
        let cni_path = [self.path("bin"), PathBuf::from(REFERENCE_PLUGINS)];
        let binary = cni_path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("plugin {kind} not found on {cni_path:?}"))?;
        let place = Placement {
            netns: self.node.path(),
            cgroup: None,
        };
        let joined = std::env::join_paths(&cni_path)?;
        let args = match runtime {
            Runtime::Kubelet => format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
            Runtime::Podman => format!("IgnoreUnknown=1;K8S_POD_NAME={}", pod.name),
            Runtime::Bare => String::new(),
        };
        let netns = if runtime == Runtime::Bare && command == "DEL" {
            PathBuf::new()
        } else {
            pod.ns.path()
        };
        let mut child = command_in(&binary, &place)?
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", joined)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run plugin {kind}"))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = wait_bounded(child, Duration::from_secs(40), kind)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            if stdout.trim().is_empty() {
                return Ok(Ok(Value::Null));
            }
            return Ok(Ok(serde_json::from_str(&stdout)
                .with_context(|| format!("{kind} printed {stdout:?}"))?));
        }
        let error: Value = serde_json::from_str(&stdout).with_context(|| {
            format!(
                "{kind} failed without a CNI error object; stdout {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(Err(CniFailure {
            plugin: kind.to_owned(),
            code: error["code"].as_u64().unwrap_or(0),
            msg: error["msg"].as_str().unwrap_or_default().to_owned(),
            details: error["details"].as_str().unwrap_or_default().to_owned(),
        }))
    }

    /// Whether the pod's traffic is captured right now, read from the kernel (pins or rules).
    pub fn captured(&self, name: &str) -> Result<bool> {
        let pod = self.pod(name)?;
        match self.backend {
            // Recorded and every link attached: the record comes first, the links after it.
            Backend::Ebpf => Ok(ebpf::list_pods(&self.pin_root())?
                .iter()
                .any(|p| p.uid == pod.uid && p.links.len() == ebpf::POD_LINKS)),
            Backend::Iptables => Ok(pod
                .ns
                .output(&["iptables-save", "-t", "nat"])?
                .contains("ISTIO_OUTPUT")),
        }
    }

    /// Waits (bounded) until the pod's capture is `wanted`.
    pub fn wait_captured(&self, name: &str, wanted: bool) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.captured(name)? == wanted {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "pod {name} captured={} after {WAIT:?}, wanted {wanted}; agent log:\n{}",
            !wanted,
            self.agent
                .as_ref()
                .map(|a| a.log().join("\n"))
                .unwrap_or_default()
        )
    }

    /// `GET /readyz` on the agent: (status code, body).
    pub fn readyz(&self) -> Result<(u16, String)> {
        crate::daemon::http(
            self.health.context("the agent has not started")?,
            "GET",
            "/readyz",
        )
    }

    /// `GET /metrics` on the agent: its counters, Prometheus text.
    pub fn agent_metrics(&self) -> Result<String> {
        let (status, body) = crate::daemon::http(
            self.health.context("the agent has not started")?,
            "GET",
            "/metrics",
        )?;
        ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(body)
    }

    /// Waits (bounded) for `/readyz` to answer `status`.
    pub fn wait_ready(&self, status: u16) -> Result<String> {
        self.wait_readyz(status, "")
    }

    /// Waits (bounded) for `/readyz` to answer `status` with a body containing `reason`.
    pub fn wait_readyz(&self, status: u16, reason: &str) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            last = self.readyz()?;
            if last.0 == status && last.1.contains(reason) {
                return Ok(last.1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "/readyz stayed {} ({:?}), wanted {status} with {reason:?}",
            last.0,
            last.1
        )
    }
}

fn netns_inode(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat netns {}", path.display()))?
        .ino())
}

fn wait_bounded(
    mut child: std::process::Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::Output> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        // Finely: pod-start times a sandbox's ADD with this (a coarser poll rounds every
        // measurement up to its step).
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("plugin {what} did not finish within {limit:?}")
}
