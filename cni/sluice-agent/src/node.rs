//! The agent's state and its one event loop: what the source wants meshed, what is captured,
//! and what the proxy has been told. Every pod mutation happens on this one thread, in event
//! order, so there are no locks around capture state.
//!
//! Invariants:
//! - A pod is in `pods` exactly when its capture is in place (and its record written). It is
//!   handed to the proxy only after that, so the proxy never serves an uncaptured pod, and a
//!   captured pod without a proxy refuses traffic (fail closed).
//! - The agent holds each captured pod's netns open, so the netns it tells the proxy about is
//!   the one it captured, even if the runtime has already unmounted it.
//! - Every proxy (re)connection gets the whole set of captured pods, then `snapshot_sent`.
//! - The node's own network namespace is never captured.
//! - A pod is captured with the addresses the node assigned it (the CNI result at ADD, its
//!   status otherwise), never ones read from inside it, and an address has one owner: a pod
//!   claiming an address another captured pod holds is refused, counted and keeps the agent
//!   unready.
//! - Every netns inode number the agent compares is one of a netns it holds open (captured
//!   pods, released sandboxes), so it cannot have been reused for another namespace.
//! - A selected pod running on the node is captured, or the agent is unready and names it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use sluice_capture::ebpf::EbpfCapture;
use sluice_capture::iptables::IptablesCapture;
use sluice_capture::netns::Netns;
use sluice_capture::{Backend, PodCapture, PodUid, Redirector};
use sluice_cni::agent_api::{Reply, Request};
use sluice_zds::Channel;
use tracing::{debug, error, info, warn};

use crate::find;
use crate::handoff::Proxy;
use crate::health::Health;
use crate::record::{PodRecord, Records};
use crate::selection::{PodInfo, Selector, World};

mod cni;
mod released;

use released::{Released, Seen};

/// How often the loop looks at the proxy, retries and waiters when no event comes.
const TICK: Duration = Duration::from_millis(250);
/// Retry delays for a pod that failed: doubling from the first, capped at the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often selected pods that are not captured are looked for on the node: a sandbox can come
/// up without the plugin (before the agent installed it, or while the primary CNI had rewritten
/// the conflist), and is then captured within this time.
const RESCAN: Duration = Duration::from_secs(2);
/// How long a sandbox's processes may run on after its CNI DEL before the agent reports the pod
/// as running uncaptured: runtimes stop them around the DEL, within moments.
const LINGER: Duration = Duration::from_secs(5);

pub enum Event {
    /// The source's whole view of namespaces and this node's pods.
    World(World),
    /// A CNI plugin request; the reply goes back on the sender.
    Cni(Request, Sender<Reply>),
    /// A proxy connected to the hand-off socket.
    Proxy(Channel),
    Stop,
}

impl From<World> for Event {
    fn from(world: World) -> Self {
        Event::World(world)
    }
}

pub struct Config {
    pub selector: Selector,
    /// Where pod cgroups are looked for (the cgroup v2 mount).
    pub cgroup_root: PathBuf,
    /// The proxy's cgroup for `SO_ORIGINAL_DST` (eBPF); found from the proxy's pid when unset.
    pub proxy_cgroup: Option<PathBuf>,
    /// How long a CNI ADD waits for the proxy to take the pod.
    pub cni_wait: Duration,
    /// Each pod's bound on captured outbound sockets (eBPF).
    pub max_outbound_per_pod: u32,
    /// The cgroup whose sockets are the node's own (eBPF: where `bind_node_probe4/6` attach);
    /// the cgroup v2 root on a real node. `None`: the node's probes are not exempted.
    pub node_cgroup: Option<PathBuf>,
    /// The node's netns (the agent's own on a real node; the lab names its node netns).
    pub node_netns: Netns,
    /// Kubernetes mode: the API server, for annotations and lookups.
    pub cluster: Option<crate::cluster::Handle>,
}

/// The capture backend, with the eBPF one's node-level extra (the proxy's cgroup program).
pub enum Capture {
    Ebpf(EbpfCapture),
    Iptables(IptablesCapture),
}

impl Capture {
    fn redirector(&mut self) -> &mut dyn Redirector {
        match self {
            Capture::Ebpf(c) => c,
            Capture::Iptables(c) => c,
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Capture::Ebpf(_) => Backend::Ebpf,
            Capture::Iptables(_) => Backend::Iptables,
        }
    }
}

/// Keeps the node's probe SNAT (iptables) equal to the captured addresses on a thread of its
/// own: each sync runs `iptables-save` and `iptables-restore` per family, tens of milliseconds
/// a pod's CNI ADD must not wait for on the event loop. The thread applies the latest set it
/// was given (older ones are skipped) and ends when the agent drops this.
struct SnatSyncer {
    sent: Option<Vec<std::net::IpAddr>>,
    tx: Sender<Vec<std::net::IpAddr>>,
    /// The last sync's failure, if it failed.
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

impl SnatSyncer {
    fn start(node_netns: &Path) -> std::io::Result<Self> {
        let netns = Netns::open(node_netns)?;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<std::net::IpAddr>>();
        let failed = Arc::new(std::sync::Mutex::new(None));
        let report = failed.clone();
        std::thread::Builder::new()
            .name("probe-snat".into())
            .spawn(move || {
                while let Ok(mut addrs) = rx.recv() {
                    // Only the newest set matters.
                    while let Ok(newer) = rx.try_recv() {
                        addrs = newer;
                    }
                    let outcome = sluice_capture::node::sync_probe_snat(&netns, &addrs);
                    let failure = match outcome {
                        Ok(()) => {
                            debug!(addrs = addrs.len(), "node probe SNAT synced");
                            None
                        }
                        Err(e) => {
                            error!(error = %e, "cannot sync the node's probe SNAT");
                            Some(e.to_string())
                        }
                    };
                    *report
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = failure;
                }
            })?;
        Ok(Self {
            sent: None,
            tx,
            failed,
        })
    }

    /// Asks for `addrs` (nothing is sent when it is what was asked last).
    fn want(&mut self, addrs: Vec<std::net::IpAddr>) {
        if self.sent.as_ref() == Some(&addrs) {
            return;
        }
        if self.tx.send(addrs.clone()).is_ok() {
            self.sent = Some(addrs);
        }
    }

    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A pod whose capture is in place.
struct Captured {
    uid: PodUid,
    info: PodInfo,
    netns: Netns,
    record: PodRecord,
    /// The connected proxy serves it.
    acked: bool,
}

struct Failure {
    error: String,
    attempts: u32,
    next: Instant,
}

/// A CNI ADD waiting for the proxy to take its pod.
struct Waiter {
    uid: String,
    /// The sandbox (`CNI_CONTAINERID`) and the pod (`namespace/name`), for the log.
    container: String,
    pod: String,
    reply: Sender<Reply>,
    deadline: Instant,
}

impl Waiter {
    fn answer(&self, reply: Reply) {
        cni::log_add(&self.container, &self.pod, &reply);
        let _ = self.reply.send(reply);
    }
}

pub struct Node {
    cfg: Config,
    capture: Capture,
    records: Records,
    health: Arc<Health>,
    host_netns: Vec<u64>,
    world: Option<World>,
    pods: BTreeMap<String, Captured>,
    failures: BTreeMap<String, Failure>,
    /// Sandboxes released by CNI DEL: never captured again, even while their processes
    /// linger before the runtime kills them.
    released: Released,
    /// Selected pods running on the node uncaptured, with why (uid → reason), as of the last
    /// reconcile: each keeps the agent unready.
    uncaptured: BTreeMap<String, String>,
    proxy: Option<Proxy>,
    proxy_cgroup_attached: Option<PathBuf>,
    /// Why the node's probes are not exempted right now (`None`: they are, or not asked for).
    node_probes: Option<String>,
    /// The node's probe SNAT (iptables), synced off the event loop.
    probe_snat: Option<SnatSyncer>,
    waiters: Vec<Waiter>,
    /// CNI requests that came before the first world.
    deferred: Vec<(Request, Sender<Reply>)>,
    /// Pods fetched from the API server for a sandbox start, kept in the world until the watch
    /// delivers them (or their sandbox is deleted): a lagging watch must not release them.
    fetched: BTreeMap<String, (PodInfo, Option<crate::selection::NamespaceInfo>)>,
    next_rescan: Instant,
}

impl Node {
    pub fn new(cfg: Config, capture: Capture, records: Records, health: Arc<Health>) -> Self {
        Self {
            cfg,
            capture,
            records,
            health,
            host_netns: find::host_netns_inodes(),
            world: None,
            pods: BTreeMap::new(),
            failures: BTreeMap::new(),
            released: Released::default(),
            uncaptured: BTreeMap::new(),
            proxy: None,
            proxy_cgroup_attached: None,
            node_probes: None,
            probe_snat: None,
            waiters: Vec::new(),
            deferred: Vec::new(),
            fetched: BTreeMap::new(),
            next_rescan: Instant::now() + RESCAN,
        }
    }

    /// Runs until `Stop` or until every sender is gone. Capture stays in place when it returns:
    /// a restarting agent must not open a window where pods' traffic bypasses the mesh.
    pub fn run(mut self, events: Receiver<Event>) {
        if let (Capture::Ebpf(capture), Some(cgroup)) = (&mut self.capture, &self.cfg.proxy_cgroup)
        {
            match capture.attach_proxy(cgroup) {
                Ok(()) => self.proxy_cgroup_attached = Some(cgroup.clone()),
                Err(e) => error!(error = %e, "cannot attach to the proxy cgroup"),
            }
        }
        self.setup_node_probes();
        loop {
            self.health.beat();
            match events.recv_timeout(TICK) {
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.housekeeping();
        }
        info!(
            pods = self.pods.len(),
            "agent stopping; capture stays in place"
        );
        for waiter in self.waiters.drain(..) {
            waiter.answer(try_again("the agent is stopping", "retry the sandbox"));
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::World(world) => {
                let first = self.world.is_none();
                self.world = Some(world);
                self.merge_fetched();
                if first {
                    self.adopt();
                }
                self.reconcile();
                for (request, reply) in std::mem::take(&mut self.deferred) {
                    self.cni(request, reply);
                }
            }
            Event::Cni(request, reply) if self.world.is_none() => {
                self.deferred.push((request, reply));
            }
            Event::Cni(request, reply) => self.cni(request, reply),
            Event::Proxy(channel) => self.proxy_connected(channel),
            Event::Stop => {}
        }
    }

    /// Adds the fetched pods the watch has not delivered yet to the world; forgets those it has.
    fn merge_fetched(&mut self) {
        let Some(world) = &mut self.world else { return };
        self.fetched.retain(|uid, _| !world.pods.contains_key(uid));
        for (uid, (info, namespace)) in &self.fetched {
            world.pods.insert(uid.clone(), info.clone());
            if let Some(ns) = namespace {
                world
                    .namespaces
                    .entry(ns.name.clone())
                    .or_insert_with(|| ns.clone());
            }
        }
    }

    /// Brings capture in line with the world: releases pods no longer selected, captures
    /// selected pods that run here and are not captured yet.
    fn reconcile(&mut self) {
        let Some(world) = &self.world else { return };
        let desired: BTreeMap<String, PodInfo> = self
            .cfg
            .selector
            .desired(world)
            .into_iter()
            .map(|(uid, pod)| (uid.to_owned(), pod.clone()))
            .collect();
        // Released sandboxes and failures only matter while the world still has the pod.
        self.released.retain(|uid| desired.contains_key(uid));
        self.failures.retain(|uid, _| desired.contains_key(uid));
        self.uncaptured.clear();

        let unwanted: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in unwanted {
            self.release(&uid, "no longer selected");
        }

        let now = Instant::now();
        let missing: Vec<&PodInfo> = desired
            .values()
            .filter(|pod| !self.pods.contains_key(&pod.uid))
            .filter(|pod| self.failures.get(&pod.uid).is_none_or(|f| f.next <= now))
            .collect();
        if missing.is_empty() {
            return;
        }
        let cgroups = match find::pod_cgroups(&self.cfg.cgroup_root) {
            Ok(cgroups) => cgroups,
            Err(e) => {
                error!(root = %self.cfg.cgroup_root.display(), error = %e, "cannot walk the cgroup tree");
                return;
            }
        };
        let missing: Vec<PodInfo> = missing.into_iter().cloned().collect();
        for pod in missing {
            if let Err(e) = self.capture_running(&pod, &cgroups) {
                self.fail(&pod, e);
            }
        }
    }

    /// Captures a pod that is already running (found through its cgroup). A pod that is not
    /// running here yet is not an error: the CNI plugin brings it when its sandbox starts.
    fn capture_running(
        &mut self,
        pod: &PodInfo,
        cgroups: &HashMap<String, PathBuf>,
    ) -> Result<(), String> {
        let Some(cgroup) = cgroups.get(&pod.uid) else {
            debug!(pod = %pod.uid, "selected pod has no cgroup on this node (yet)");
            self.released.forget(&pod.uid);
            return Ok(());
        };
        let found = find::netns_of_cgroup(cgroup)
            .map_err(|e| format!("read processes of {}: {e}", cgroup.display()))?;
        let Some((netns, label)) = found else {
            debug!(pod = %pod.uid, "selected pod has no process yet");
            // Whatever runs in its cgroup from now on is a new sandbox.
            self.released.forget(&pod.uid);
            return Ok(());
        };
        let ino = netns
            .inode()
            .map_err(|e| format!("stat {}: {e}", label.display()))?;
        match self.released.seen(&pod.uid, ino) {
            Seen::Lingering(since) => {
                self.lingering(pod, since);
                return Ok(());
            }
            Seen::Replaced => {
                info!(pod = %pod.uid, netns = %label.display(), "a new sandbox of a released pod runs; capturing it");
            }
            Seen::Unknown => {}
        }
        let cgroup = Some(cgroup.clone());
        self.capture_pod(pod, netns, label, cgroup, pod.ips.clone(), None)
    }

    /// A pod's processes still run in the sandbox CNI DEL released `since` ago: it stays
    /// uncaptured (its address may be another pod's by now), and past [`LINGER`] the agent says
    /// so in its readiness.
    fn lingering(&mut self, pod: &PodInfo, since: Duration) {
        debug!(pod = %pod.uid, since_ms = since.as_millis() as u64,
               "released by CNI DEL; its processes are on their way out");
        if since < LINGER {
            return;
        }
        let why = format!(
            "pod {}/{} ({}) is selected and runs on this node uncaptured: CNI DEL released its \
             sandbox {} s ago, yet processes still run in it (the runtime has not stopped them; \
             the pod's next sandbox is captured)",
            pod.namespace,
            pod.name,
            pod.uid,
            since.as_secs()
        );
        self.uncaptured.insert(pod.uid.clone(), why);
    }

    /// Refuses addresses another captured pod holds: traffic for an address goes to the pod
    /// the node gave it, never to one that claims it later.
    fn check_owners(&self, pod: &PodInfo, addrs: &[std::net::IpAddr]) -> Result<(), String> {
        for other in self.pods.values().filter(|p| p.record.uid != pod.uid) {
            if let Some(addr) = addrs.iter().find(|a| other.record.addrs.contains(a)) {
                self.health.count_refusal("address_conflict");
                warn!(pod = %pod.uid, name = %pod.name, namespace = %pod.namespace, %addr,
                      owner = %other.record.uid, "refused: the address belongs to another captured pod");
                return Err(format!(
                    "address {addr} belongs to captured pod {}/{} ({}); refusing pod {}/{} \
                     (an address has one owner: release the other pod first if it is gone)",
                    other.info.namespace,
                    other.info.name,
                    other.record.uid,
                    pod.namespace,
                    pod.name
                ));
            }
        }
        Ok(())
    }

    /// Puts `pod`'s traffic through the proxy (idempotent for the same netns), then hands the pod
    /// to the proxy if one is connected. `container_id`: the sandbox's, when its ADD brought it.
    fn capture_pod(
        &mut self,
        pod: &PodInfo,
        netns: Netns,
        label: PathBuf,
        cgroup: Option<PathBuf>,
        addrs: Vec<std::net::IpAddr>,
        container_id: Option<&str>,
    ) -> Result<(), String> {
        let uid = PodUid::parse(&pod.uid).map_err(|e| e.to_string())?;
        let ino = netns
            .inode()
            .map_err(|e| format!("stat netns {}: {e}", label.display()))?;
        if self.host_netns.contains(&ino) {
            return Err(format!(
                "netns {} is the node's own network namespace; refusing to capture it \
                 (is the pod hostNetwork?)",
                label.display()
            ));
        }
        if self.capture.backend() == Backend::Ebpf && cgroup.is_none() {
            return Err(format!(
                "no cgroup named after pod uid {} under {}; eBPF outbound capture attaches to \
                 the pod's cgroup (check --cgroup-root and the kubelet cgroup driver)",
                pod.uid,
                self.cfg.cgroup_root.display()
            ));
        }
        if addrs.is_empty() {
            return Err(format!(
                "no address for pod {}/{}: neither the CNI result nor the pod's status names \
                 one; it is captured once the cluster assigns one (standalone mode: list its \
                 `ips` in the pods file)",
                pod.namespace, pod.name
            ));
        }
        self.check_owners(pod, &addrs)?;
        if let Some(existing) = self.pods.get_mut(&pod.uid) {
            if existing.record.netns_ino == ino {
                // The same sandbox (found through its cgroup before its ADD came): learn its
                // container id, which its DEL may be all there is to go by.
                if container_id.is_some() && existing.record.container_id.as_deref() != container_id
                {
                    existing.record.container_id = container_id.map(str::to_owned);
                    if let Err(e) = self.records.save(&existing.record) {
                        warn!(pod = %pod.uid, error = %e, "cannot write the pod record");
                    }
                }
                return Ok(());
            }
            // Same pod, new sandbox: the old one's capture goes first.
            self.release(&pod.uid.clone(), "its sandbox was replaced");
        }
        // Not ready from the moment capture starts until the proxy serves the pod: a probe
        // must never see "ready" while a captured pod is not served yet.
        self.health
            .set_pods(Err(format!("capturing pod {} for the proxy", pod.uid)));
        let spec = PodCapture {
            cgroup: cgroup.clone(),
            addrs: addrs.clone(),
            max_tracked_sockets: self.cfg.max_outbound_per_pod,
            ..PodCapture::new(uid, fd_path(&netns))
        };
        self.capture.redirector().enroll(&spec).map_err(|e| {
            if matches!(e, sluice_capture::CaptureError::AddressOwned { .. }) {
                self.health.count_refusal("address_conflict");
            }
            format!("capture: {e}")
        })?;
        let record = PodRecord {
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            netns: label,
            netns_ino: ino,
            cgroup,
            addrs,
            container_id: container_id.map(str::to_owned),
        };
        if let Err(e) = self.records.save(&record) {
            // Capture works; only a restarted agent would have to capture the pod again.
            warn!(pod = %pod.uid, error = %e, "cannot write the pod record");
        }
        info!(pod = %pod.uid, name = %pod.name, namespace = %pod.namespace,
              netns = %record.netns.display(), backend = %self.capture.backend(), "pod captured");
        self.failures.remove(&pod.uid);
        if let Some(cluster) = &self.cfg.cluster {
            cluster.annotate(pod, true);
        }
        self.pods.insert(
            pod.uid.clone(),
            Captured {
                uid: spec.uid,
                info: pod.clone(),
                netns,
                record,
                acked: false,
            },
        );
        self.hand_over(&pod.uid);
        Ok(())
    }

    /// Tells the connected proxy about a captured pod.
    fn hand_over(&mut self, uid: &str) {
        let (Some(proxy), Some(pod)) = (&self.proxy, self.pods.get_mut(uid)) else {
            return;
        };
        match proxy.add(&pod.info, pod.netns.as_fd()) {
            Ok(()) => {
                pod.acked = true;
                debug!(pod = uid, "proxy took the pod");
                self.answer_waiters(uid, || Reply::Enrolled);
            }
            Err(e) => {
                let info = pod.info.clone();
                if e.connection_lost() {
                    self.proxy_lost(&e);
                }
                self.fail(&info, format!("hand-off: {e}"));
            }
        }
    }

    /// Takes a pod out: the proxy stops serving it, then its capture is removed. Returns the
    /// netns it was captured in, still open.
    fn release(&mut self, uid: &str, why: &str) -> Option<Netns> {
        let pod = self.pods.remove(uid)?;
        if let Some(proxy) = &self.proxy
            && let Err(e) = proxy.del(uid)
        {
            warn!(pod = uid, error = %e, "proxy did not take the removal");
            if e.connection_lost() {
                self.proxy_lost(&e);
            }
        }
        let spec = PodCapture {
            cgroup: pod.record.cgroup.clone(),
            ..PodCapture::new(pod.uid.clone(), fd_path(&pod.netns))
        };
        if let Err(e) = self.capture.redirector().remove(&spec) {
            error!(pod = uid, error = %e, "cannot remove the pod's capture");
        }
        if let Err(e) = self.records.remove(uid) {
            warn!(pod = uid, error = %e, "cannot remove the pod record");
        }
        if let Some(cluster) = &self.cfg.cluster {
            cluster.annotate(&pod.info, false);
        }
        info!(pod = uid, name = %pod.info.name, namespace = %pod.info.namespace, why, "pod released");
        self.answer_waiters(uid, || {
            try_again("the pod was released while waiting", "retry the sandbox")
        });
        Some(pod.netns)
    }

    fn fail(&mut self, pod: &PodInfo, error: String) {
        let attempts = self.failures.get(&pod.uid).map_or(0, |f| f.attempts) + 1;
        let delay = RETRY_FIRST
            .saturating_mul(1 << attempts.min(8).saturating_sub(1))
            .min(RETRY_MAX);
        warn!(pod = %pod.uid, name = %pod.name, namespace = %pod.namespace, attempts,
              retry_in_ms = delay.as_millis() as u64, error = %error, "pod not meshed");
        self.failures.insert(
            pod.uid.clone(),
            Failure {
                error,
                attempts,
                next: Instant::now() + delay,
            },
        );
    }

    /// A proxy said hello: attach its cgroup program (eBPF), then send the whole snapshot.
    fn proxy_connected(&mut self, channel: Channel) {
        let proxy = match Proxy::accept(channel) {
            Ok(proxy) => proxy,
            Err(e) => {
                warn!(error = %e, "refused a proxy connection");
                return;
            }
        };
        info!(
            pid = proxy.pid,
            pods = self.pods.len(),
            "proxy connected; sending the snapshot"
        );
        self.attach_proxy_cgroup(proxy.pid);
        self.proxy = Some(proxy);
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for pod in self.pods.values_mut() {
            pod.acked = false;
        }
        for uid in uids {
            self.hand_over(&uid);
            if self.proxy.is_none() {
                return;
            }
        }
        if let Some(proxy) = &self.proxy
            && let Err(e) = proxy.snapshot_sent()
        {
            warn!(error = %e, "snapshot_sent was not acked");
            if e.connection_lost() {
                self.proxy_lost(&e);
            }
        }
    }

    fn attach_proxy_cgroup(&mut self, pid: u32) {
        let Capture::Ebpf(capture) = &mut self.capture else {
            return;
        };
        if self.cfg.proxy_cgroup.is_some() {
            return; // fixed by flag, attached at start
        }
        let cgroup = match find::cgroup_of_pid(pid, &self.cfg.cgroup_root) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                error!(pid, error = %e, "cannot find the proxy's cgroup; outbound capture will fail closed");
                return;
            }
        };
        if self.proxy_cgroup_attached.as_ref() == Some(&cgroup) {
            return;
        }
        match capture.attach_proxy(&cgroup) {
            Ok(()) => self.proxy_cgroup_attached = Some(cgroup),
            Err(e) => error!(pid, error = %e, "cannot attach to the proxy's cgroup"),
        }
    }

    fn proxy_lost(&mut self, why: &dyn std::fmt::Display) {
        if self.proxy.take().is_some() {
            warn!(error = %why, "proxy connection lost; capture stays (traffic is refused until it is back)");
        }
        for pod in self.pods.values_mut() {
            pod.acked = false;
        }
    }

    fn answer_waiters(&mut self, uid: &str, reply: impl Fn() -> Reply) {
        self.waiters.retain(|w| {
            if w.uid == uid {
                w.answer(reply());
                false
            } else {
                true
            }
        });
    }

    fn housekeeping(&mut self) {
        if self.proxy.as_ref().is_some_and(Proxy::gone) {
            self.proxy_lost(&"the proxy hung up");
        }
        let now = Instant::now();
        if now >= self.next_rescan {
            self.next_rescan = now + RESCAN;
            // Walks the cgroup tree only if a selected pod is not captured.
            self.reconcile();
            self.keep_node_probes();
        }
        if self.failures.values().any(|f| f.next <= now) {
            // Pods captured but refused by the proxy are retried by handing them over again.
            let refused: Vec<String> = self
                .failures
                .iter()
                .filter(|(uid, f)| f.next <= now && self.pods.contains_key(*uid))
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in refused {
                self.failures.remove(&uid);
                self.hand_over(&uid);
            }
            self.reconcile();
        }
        let cni_wait = self.cfg.cni_wait;
        self.waiters.retain(|w| {
            if w.deadline > now {
                return true;
            }
            w.answer(try_again(
                &format!(
                    "the proxy did not take pod {} within {} s",
                    w.uid,
                    cni_wait.as_secs()
                ),
                "pod capture is in place; is sluice-proxy running and connected to the agent's \
                 hand-off socket? See both logs",
            ));
            false
        });
        self.sync_probe_snat();
        self.health.set_pods(self.readiness());
    }

    fn readiness(&self) -> Result<(), String> {
        if let Some(why) = &self.node_probes {
            return Err(format!(
                "the node's probes are not exempted from capture: {why}"
            ));
        }
        if self.world.is_none() {
            return Err("waiting for the first list of pods".into());
        }
        if self.proxy.is_none() {
            return Err("no proxy connected to the hand-off socket".into());
        }
        if let Some((uid, f)) = self.failures.iter().next() {
            return Err(format!(
                "pod {uid} failed {} time(s): {}",
                f.attempts, f.error
            ));
        }
        if let Some(why) = self.uncaptured.values().next() {
            return Err(why.clone());
        }
        if let Some(uid) = self.pods.iter().find(|(_, p)| !p.acked).map(|(u, _)| u) {
            return Err(format!("the proxy has not taken pod {uid} yet"));
        }
        Ok(())
    }

    /// Makes the node's own connections to captured pods (kubelet's probes) reach the app
    /// uncaptured, Istio's way: they leave from the probe address, which every pod's capture
    /// lets through. eBPF: the address on `lo` and the bind programs on the node's cgroup;
    /// iptables: the SNAT chain, synced with the captured addresses on every turn.
    fn setup_node_probes(&mut self) {
        let Some(cgroup) = self.cfg.node_cgroup.clone() else {
            // Turned off: take away what an earlier agent set up, so nothing is exempt.
            let node = &self.cfg.node_netns;
            let removed = match &mut self.capture {
                Capture::Ebpf(capture) => capture
                    .detach_node()
                    .and_then(|()| sluice_capture::node::remove_probe_addresses(node)),
                Capture::Iptables(_) => sluice_capture::node::remove_probe_snat(node),
            };
            if let Err(e) = removed {
                warn!(error = %e, "cannot remove an earlier node probe exemption");
            }
            return;
        };
        let result = match &mut self.capture {
            Capture::Ebpf(capture) => {
                sluice_capture::node::ensure_probe_addresses(&self.cfg.node_netns)
                    .and_then(|()| capture.attach_node(&cgroup, &self.cfg.node_netns).map(drop))
            }
            Capture::Iptables(_) => Ok(()),
        };
        self.node_probes = result.err().map(|e| {
            error!(error = %e, "cannot exempt the node's probes; under STRICT they will be refused");
            e.to_string()
        });
    }

    /// Puts the probe addresses back if something removed them from the node (eBPF), and
    /// retries a failed set-up.
    fn keep_node_probes(&mut self) {
        if self.cfg.node_cgroup.is_none() {
            return;
        }
        // A failed SNAT sync is tried again with the next turn's set.
        if let Some(syncer) = &mut self.probe_snat
            && syncer.failure().is_some()
        {
            syncer.sent = None;
        }
        if self.node_probes.is_some() {
            self.setup_node_probes();
            return;
        }
        if let Capture::Ebpf(_) = self.capture
            && let Err(e) = sluice_capture::node::ensure_probe_addresses(&self.cfg.node_netns)
        {
            error!(error = %e, "cannot restore the probe addresses on lo");
            self.node_probes = Some(e.to_string());
        }
    }

    /// iptables: SNATs the node's own connections to exactly the captured pods' addresses.
    fn sync_probe_snat(&mut self) {
        if self.cfg.node_cgroup.is_none() || !matches!(self.capture, Capture::Iptables(_)) {
            return;
        }
        let mut addrs: Vec<std::net::IpAddr> = self
            .pods
            .values()
            .flat_map(|p| p.record.addrs.iter().copied())
            .collect();
        addrs.sort();
        addrs.dedup();
        if self.probe_snat.is_none() {
            match SnatSyncer::start(self.cfg.node_netns.path()) {
                Ok(syncer) => self.probe_snat = Some(syncer),
                Err(e) => {
                    self.node_probes = Some(format!("open the node's netns: {e}"));
                    return;
                }
            }
        }
        if let Some(syncer) = &mut self.probe_snat {
            syncer.want(addrs);
            self.node_probes = syncer.failure();
        }
    }

    /// After a restart: take over the pods an earlier agent captured, without touching the
    /// capture of those still selected and running in the same netns.
    fn adopt(&mut self) {
        let mut records = match self.records.load() {
            Ok(records) => records,
            Err(e) => {
                error!(error = %e, "cannot read pod records");
                Vec::new()
            }
        };
        if let Capture::Ebpf(capture) = &self.capture {
            // A pod captured just before a crash may have pins but no record yet.
            for pinned in capture.pods().unwrap_or_default() {
                if !records.iter().any(|r| r.uid == pinned.uid) {
                    records.push(PodRecord {
                        uid: pinned.uid.clone(),
                        namespace: String::new(),
                        name: String::new(),
                        netns: PathBuf::new(),
                        netns_ino: pinned.netns_ino,
                        cgroup: None,
                        addrs: pinned.addrs.clone(),
                        container_id: None,
                    });
                }
            }
        }
        if records.is_empty() {
            return;
        }
        let cgroups = find::pod_cgroups(&self.cfg.cgroup_root).unwrap_or_default();
        let Some(world) = &self.world else { return };
        let desired = self.cfg.selector.desired(world);
        let mut adopted = Vec::new();
        let mut stale = Vec::new();
        for record in records {
            let netns = reopen(&record, &cgroups);
            match (netns, desired.get(record.uid.as_str())) {
                (Some(netns), Some(info)) => {
                    let Ok(uid) = PodUid::parse(&record.uid) else {
                        continue;
                    };
                    let mut record = record;
                    if record.cgroup.is_none() {
                        record.cgroup = cgroups.get(&record.uid).cloned();
                    }
                    adopted.push(Captured {
                        uid,
                        info: (*info).clone(),
                        netns,
                        record,
                        acked: false,
                    });
                }
                (netns, _) => stale.push((record, netns)),
            }
        }
        for pod in adopted {
            info!(pod = %pod.record.uid, netns = %pod.record.netns.display(), "adopted a captured pod");
            self.pods.insert(pod.record.uid.clone(), pod);
        }
        for (record, netns) in stale {
            self.release_stale(&record, netns);
        }
    }

    /// Removes the capture of a pod from before a restart that is gone or no longer selected.
    fn release_stale(&mut self, record: &PodRecord, netns: Option<Netns>) {
        if let Ok(uid) = PodUid::parse(&record.uid) {
            // With its netns gone, the iptables rules went with it; eBPF state goes by uid.
            let path = netns.as_ref().map_or_else(|| record.netns.clone(), fd_path);
            let spec = PodCapture {
                cgroup: record.cgroup.clone(),
                ..PodCapture::new(uid, path)
            };
            if let Err(e) = self.capture.redirector().remove(&spec) {
                error!(pod = %record.uid, error = %e, "cannot remove a stale pod's capture");
                return;
            }
        }
        let _ = self.records.remove(&record.uid);
        info!(pod = %record.uid, "released a pod captured before the restart that is gone or no longer selected");
    }
}

/// Re-opens a recorded pod's netns: its recorded path if it still names the same namespace,
/// else through a process in the pod's cgroup.
fn reopen(record: &PodRecord, cgroups: &HashMap<String, PathBuf>) -> Option<Netns> {
    let same = |netns: &Netns| netns.inode().ok() == Some(record.netns_ino);
    if !record.netns.as_os_str().is_empty()
        && let Ok(netns) = Netns::open(&record.netns)
        && same(&netns)
    {
        return Some(netns);
    }
    let cgroup = cgroups.get(&record.uid)?;
    let (netns, _) = find::netns_of_cgroup(cgroup).ok()??;
    same(&netns).then_some(netns)
}

/// A path that opens the namespace the agent holds, whatever happened to the original path.
fn fd_path(netns: &Netns) -> PathBuf {
    Path::new("/proc/self/fd").join(netns.as_fd().as_raw_fd().to_string())
}

fn try_again(msg: &str, details: &str) -> Reply {
    Reply::Failed {
        code: sluice_cni::spec::ErrorCode::TryAgainLater as u32,
        msg: msg.to_owned(),
        details: details.to_owned(),
    }
}
