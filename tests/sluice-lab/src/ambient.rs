//! A two-node ambient cluster run the way a real one runs: each node is an [`AgentLab`] (its
//! own netns with the CNI chain bridge + host-local + sluice-cni, its `sluice-cni-agent` on a
//! pods file, its `sluice-proxy` on the agent's hand-off socket), the nodes are routed over one
//! veth link, and both proxies share a CA and a mesh file.
//!
//! The lab is also the control plane: like istiod, it publishes each pod as a workload in the
//! mesh file, as `HBONE` once its node has captured it and `TCP` before (a destination is only
//! tunnelled to once its proxy serves it), with the policies set on the cluster.
//!
//! ```text
//!  sleep ─┐                                              ┌─ echo
//!  notsleep ┤ cni0  node-a ══ 10.98.0.1 ↔ 10.98.0.2 ══ node-b  cni0 ├─ …
//!  (agent A + proxy A, in the host netns)     (agent B + proxy B)
//! ```

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use sluice_capture::Backend;

use crate::agent::{AgentLab, CgroupDriver, SandboxPod};
use crate::cluster::{LinkCapture, init_ca, write_mesh_file};
use crate::lab::{DirGuard, run, unique_id};

/// The nodes' names in the mesh file and their pod subnets.
pub const NODES: [(&str, &str); 2] = [("node-a", "10.97.1.0/24"), ("node-b", "10.97.2.0/24")];
/// The inter-node link's address on each node.
const LINK: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 98, 0, 1), Ipv4Addr::new(10, 98, 0, 2)];
/// The namespace label that meshes a namespace's pods.
pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode=ambient";

/// Field order is drop order: nodes (daemons, pods, capture), then the CA and mesh file.
pub struct AmbientCluster {
    pub nodes: Vec<AgentLab>,
    dir: DirGuard,
    pub backend: Backend,
    pub id: String,
    link: String,
    /// The mesh file's `policies:` list, as YAML.
    policies: String,
}

impl AmbientCluster {
    /// Both nodes up: link routed, CA created, each node's agent and proxy running.
    pub fn new(backend: Backend) -> Result<Self> {
        let id = unique_id();
        let dir = DirGuard::new(&format!("sluice-ambient-{id}"))?;
        // Different kubelet cgroup drivers on the two nodes: both layouts are found.
        let drivers = [CgroupDriver::Systemd, CgroupDriver::Cgroupfs];
        let mut nodes = Vec::new();
        for (n, (_, subnet)) in NODES.iter().enumerate() {
            nodes.push(AgentLab::with_subnet(backend, drivers[n], subnet)?);
        }
        let link = format!("sl{id}l");
        let mut cluster = Self {
            nodes,
            dir,
            backend,
            id,
            link,
            policies: String::new(),
        };
        cluster.connect_nodes()?;
        cluster.write_mesh()?;
        init_ca(&cluster.dir.0.join("ca"))?;
        let mesh = cluster.mesh_file();
        let ca = cluster.dir.0.join("ca");
        let mesh = mesh.to_str().context("mesh path")?;
        let ca = ca.to_str().context("ca path")?;
        for node in &mut cluster.nodes {
            node.start_agent()?;
            node.start_proxy_with(&["--mesh-config", mesh, "--ca-dir", ca])?;
        }
        Ok(cluster)
    }

    /// One veth between the two node netns, with a route to the other node's pod subnet.
    fn connect_nodes(&self) -> Result<()> {
        let ends = [format!("{}0", self.link), format!("{}1", self.link)];
        run(Command::new("ip").args([
            "link",
            "add",
            &ends[0],
            "netns",
            &self.nodes[0].node.name,
            "type",
            "veth",
            "peer",
            "name",
            &ends[1],
            "netns",
            &self.nodes[1].node.name,
        ]))?;
        for n in 0..2 {
            let node = &self.nodes[n].node;
            let other = 1 - n;
            node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            node.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/30", LINK[n]),
                "dev",
                &ends[n],
            ])?;
            node.exec(&["ip", "link", "set", &ends[n], "up"])?;
            node.exec(&[
                "ip",
                "route",
                "add",
                NODES[other].1,
                "via",
                &LINK[other].to_string(),
            ])?;
        }
        Ok(())
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.dir.0.join("mesh.yaml")
    }

    /// Lists a pod on `node` in that node's pods file and starts its sandbox through the CNI
    /// chain, then publishes it in the mesh file. Fails if the chain refused the sandbox.
    pub fn start_pod(&mut self, node: usize, name: &str, namespace: &str) -> Result<()> {
        let lab = &mut self.nodes[node];
        lab.list_pod(name, namespace)?;
        if let Err(failure) = lab.start_pod(name, namespace)? {
            bail!(
                "pod {namespace}/{name} did not start on {}: {failure}",
                NODES[node].0
            );
        }
        self.publish()
    }

    /// The node a pod runs on, and the pod.
    pub fn pod(&self, name: &str) -> Result<(usize, &SandboxPod)> {
        self.nodes
            .iter()
            .enumerate()
            .find_map(|(n, lab)| lab.pod(name).ok().map(|p| (n, p)))
            .with_context(|| format!("no pod {name} in the cluster"))
    }

    /// Labels (or unlabels) a namespace in every node's pods file, waits until each node has
    /// captured (or released) its pods there, then publishes the mesh as the control plane would.
    pub fn set_ambient(&mut self, namespace: &str, ambient: bool) -> Result<()> {
        for lab in &mut self.nodes {
            lab.set_namespace(namespace, ambient)?;
        }
        for lab in &self.nodes {
            for pod in lab.pods.iter().filter(|p| p.namespace == namespace) {
                lab.wait_captured(&pod.name, ambient)?;
            }
        }
        self.publish()
    }

    /// Replaces the mesh file's Istio policy objects (a YAML list) and waits until both proxies
    /// have reloaded it.
    pub fn set_policies(&mut self, yaml: &str) -> Result<()> {
        self.policies = yaml.to_owned();
        self.publish()
    }

    /// Rewrites the mesh file from the pods and their capture, and waits for both proxies to
    /// reload it.
    fn publish(&self) -> Result<()> {
        let seen: Vec<usize> = self
            .nodes
            .iter()
            .map(|n| n.proxy().map(|p| p.count_log(&["mesh reloaded"])))
            .collect::<Result<_>>()?;
        let before = std::fs::read_to_string(self.mesh_file()).unwrap_or_default();
        self.write_mesh()?;
        if std::fs::read_to_string(self.mesh_file())? == before {
            return Ok(());
        }
        for (node, seen) in self.nodes.iter().zip(seen) {
            node.proxy()?
                .wait_for_log_lines(&["mesh reloaded"], seen + 1)?;
        }
        Ok(())
    }

    fn write_mesh(&self) -> Result<()> {
        let mut yaml = String::from("trustDomain: cluster.local\nworkloads:\n");
        for (n, lab) in self.nodes.iter().enumerate() {
            for pod in &lab.pods {
                let protocol = if lab.captured(&pod.name)? {
                    "HBONE"
                } else {
                    "TCP"
                };
                yaml.push_str(&format!(
                    "  - uid: {}\n    name: {}\n    namespace: {}\n    serviceAccount: {}\n    \
                     ips: [{}]\n    node: {}\n    protocol: {protocol}\n    labels: {{app: {}}}\n",
                    pod.uid, pod.name, pod.namespace, pod.name, pod.ip, NODES[n].0, pod.name
                ));
            }
        }
        if yaml.ends_with("workloads:\n") {
            yaml = yaml.replace("workloads:\n", "workloads: []\n");
        }
        write_mesh_file(yaml, &self.policies, &self.mesh_file())
    }

    /// Records every frame crossing the link between the nodes (seen from node-a) until dropped.
    pub fn capture_link(&self) -> Result<LinkCapture> {
        LinkCapture::start(&self.nodes[0].node.path(), &format!("{}0", self.link))
    }
}
