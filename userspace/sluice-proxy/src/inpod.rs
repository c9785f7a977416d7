//! One enrolled pod as the proxy sees it: listeners inside the pod's netns and the connections
//! accepted on them.
//!
//! Invariants:
//! - every socket of a pod (listeners and upstream connections) is created in the pod's netns,
//!   so traffic leaves with the pod's own address and routes;
//! - the proxy never runs in the pod's cgroup, so eBPF capture never sees its sockets, and it
//!   marks them 0x539 so the iptables rules let them through: no loops;
//! - dropping a `PodProxy` closes its listeners (the kernel removes the 15006 socket from the
//!   eBPF socket map, so new inbound connections are refused) and ends its connections;
//! - with the mesh on, a pod that is an HBONE workload presents its own identity, on its own
//!   15008 listener and in its own connection pool: pods never share certificates or tunnels;
//! - inbound, the app sees the client's address unless `--preserve-source=false` (see
//!   `socket::connect_app_in`); such dials are marked so iptables lets them through, registered
//!   so sk_lookup lets them through, and refused if they come back to 15006 all the same.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use sluice_capture::inbound_map::{InboundSocketMap, ProxyDials};
use sluice_capture::netns::Netns;
use sluice_capture::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND, PodUid};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::Access;
use crate::copy::{self, CopyMode};
use crate::hbone::{self, OpenError, ServerStats};
use crate::identity::Identity;
use crate::limits::{Admission, PLAINTEXT_EXTRA_FDS};
use crate::mesh::{MeshWatch, Protocol};
use crate::metrics::{Labels, UNKNOWN};
use crate::policy::{Connection, MtlsMode, Target, Verdict};
use crate::pool::{BoxFuture, Pool, PoolError, PoolKey, TcpConnect, TlsDialer};
use crate::route::{Balancer, Hop};
use crate::socket::{self, AppDials, AppSource, AppStream, ClientSource, PortChoice, canonical};
use crate::stats::Stats;
use crate::tls::CertStore;

/// What the pods of one proxy share when the mesh is on.
pub struct MeshContext {
    pub mesh: Arc<MeshWatch>,
    pub certs: Arc<CertStore>,
    pub hbone: Arc<ServerStats>,
    pub balancer: Balancer,
    /// How long a pooled HBONE connection may sit without streams.
    pub idle_timeout: Duration,
}

/// What the agent said of a pod it handed over (ZDS `WorkloadInfo`; empty fields when it sent
/// none).
#[derive(Clone, Debug)]
pub struct HandedOver {
    pub namespace: String,
    pub service_account: String,
}

/// The identity a pod's proxy presents, if the pod is in the mesh: a pod the agent handed over
/// is (it is captured: ztunnel treats every pod it is given so), with the mesh file's identity
/// for it, else the one the agent named, so it is meshed even before the control plane lists
/// it as HBONE; a pod served without an agent only when the mesh file lists it as HBONE.
fn own_identity(
    mesh: &crate::mesh::Mesh,
    uid: &PodUid,
    handed: Option<&HandedOver>,
) -> Option<Identity> {
    let handed_without_identity = handed.is_some();
    let handed = handed.filter(|h| !h.namespace.is_empty() && !h.service_account.is_empty());
    match (mesh.workload(uid.as_str()), handed) {
        (Some((w, identity)), None) if w.protocol == Protocol::Hbone => Some(identity.clone()),
        (Some((_, identity)), Some(_)) => Some(identity.clone()),
        (None, Some(h)) => Some(Identity {
            trust_domain: mesh.trust_domain.clone(),
            namespace: h.namespace.clone(),
            service_account: h.service_account.clone(),
        }),
        (Some(_), None) => None,
        (None, None) if handed_without_identity => {
            warn!(pod = %uid, "pod handed over without a namespace or service account, and not in the mesh file: no identity, so no HBONE into it; its plaintext inbound stays under policy (all denied without a namespace)");
            None
        }
        (None, None) => {
            warn!(pod = %uid, "pod is not a workload in the mesh file and was not handed over by an agent: no identity, its traffic is passed through");
            None
        }
    }
}

/// Who the policies see in pod `uid`: the mesh file's workload (its namespace and labels);
/// else, for a pod the agent handed over, a workload of the namespace the agent named whose
/// labels are unknown (selectors then fail closed); `Ok(None)` only for a pod served without an
/// agent that the mesh file does not list, whose traffic is passed through.
fn policy_target<'a>(
    mesh: &'a crate::mesh::Mesh,
    uid: &PodUid,
    handed: Option<&'a HandedOver>,
) -> Result<Option<Target<'a>>, String> {
    match (mesh.workload(uid.as_str()), handed) {
        (Some((workload, _)), _) => Ok(Some(Target {
            namespace: &workload.namespace,
            labels: Some(&workload.labels),
        })),
        (None, Some(h)) if h.namespace.is_empty() => Err(
            "the pod was handed over without a namespace and the mesh file does not list it: \
             no policy scope is known, so nothing is allowed"
                .to_owned(),
        ),
        (None, Some(h)) => Ok(Some(Target {
            namespace: &h.namespace,
            labels: None,
        })),
        (None, None) => Ok(None),
    }
}

/// What every pod of a proxy is served with.
#[derive(Clone)]
pub struct Carry {
    /// How bytes are moved between a connection's two sockets.
    pub copy: CopyMode,
    /// Whether apps see the client's address rather than the pod's (`--preserve-source`).
    pub preserve_source: bool,
    /// The pinned `SLUICE_PROXY_DIALS` under eBPF capture; `None` under iptables.
    pub proxy_dials: Option<Arc<ProxyDials>>,
    /// The node's bounds on connections and their deadlines, shared by every pod.
    pub admission: Arc<Admission>,
}

/// How a pod's apps are dialled: from inside the pod's netns, from the client's address when
/// the proxy preserves it.
struct AppDialer {
    netns: Arc<Netns>,
    dials: Arc<AppDials>,
    preserve_source: bool,
    stats: Arc<Stats>,
}

impl AppDialer {
    /// Connects to the app at `dst` for the client at `client`; a client address that could
    /// not be carried is counted (`source_not_preserved`) and the app is dialled from the pod's.
    async fn dial(
        &self,
        dst: SocketAddr,
        client: Option<SocketAddr>,
        port: PortChoice,
    ) -> std::io::Result<AppStream> {
        let source = client
            .filter(|_| self.preserve_source)
            .map(|addr| ClientSource { addr, port });
        let app = socket::connect_app_in(&self.netns, dst, source, &self.dials).await?;
        if let AppSource::NotPreserved(why) = &app.source {
            Stats::incr(&self.stats.source_not_preserved);
            debug!(client = ?client, app = %dst, why, "the app sees the pod's address, not the client's");
        }
        Ok(app)
    }
}

/// A pod's own part of the mesh: its identity and its tunnels.
struct PodMesh {
    identity: Identity,
    pool: Arc<Pool<TlsDialer>>,
}

/// TCP for a pod's HBONE connections, made in the pod's netns (they leave with its address),
/// with keepalive and `TCP_USER_TIMEOUT` so a peer that vanished is noticed.
struct PodTcp(Arc<Netns>, Arc<Admission>);

impl TcpConnect for PodTcp {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(async move {
            let tcp = socket::connect_in(&self.0, addr).await?;
            crate::limits::tune_hbone_socket(&tcp, self.1.limits());
            Ok(tcp)
        })
    }
}

/// The 15008 side of one pod. The server admits only CONNECTs to the address a tunnel arrived
/// on, which inside the pod's netns is one of the pod's own (see `hbone::check_target`).
struct PodInbound {
    uid: PodUid,
    /// The identity the pod's 15008 certificate names.
    identity: Identity,
    handed: Option<HandedOver>,
    app: Arc<AppDialer>,
    mesh: Arc<MeshWatch>,
    stats: Arc<Stats>,
}

impl PodInbound {
    /// Istio's labels for a tunnel into this pod, reported by its (destination) proxy.
    fn labels(&self, peer: &Identity, source: IpAddr) -> Labels {
        let mesh = self.mesh.current();
        let mut labels = Labels::new("destination", "mutual_tls");
        labels.source_principal = peer.to_string();
        labels.source_workload_namespace = peer.namespace.clone();
        if let Some((w, _)) = mesh.workload_at(source) {
            labels.source_workload = w.name.clone();
        }
        set_destination(&mut labels, &mesh, self.uid.as_str());
        labels
    }
}

/// Fills the destination labels with workload `uid` of `mesh`.
fn set_destination(labels: &mut Labels, mesh: &crate::mesh::Mesh, uid: &str) {
    if let Some((w, id)) = mesh.workload(uid) {
        labels.destination_workload = w.name.clone();
        labels.destination_workload_namespace = w.namespace.clone();
        labels.destination_principal = id.to_string();
    }
}

impl hbone::Inbound for PodInbound {
    fn authorize(&self, target: SocketAddr, peer: &Identity, source: IpAddr) -> Result<(), String> {
        let mesh = self.mesh.current();
        // Served on 15008 means handed over or listed: `None` only if the mesh file dropped a
        // pod served without an agent, which is then no workload to allow anything into.
        let Some(workload) = policy_target(&mesh, &self.uid, self.handed.as_ref())? else {
            return Err("the pod is no longer a workload of the mesh".to_owned());
        };
        let connection = Connection {
            source_ip: source,
            source: Some(peer),
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        match mesh.policies.authorize(&workload, &connection) {
            Verdict::Allow => Ok(()),
            Verdict::Deny { policy } => Err(policy),
        }
    }

    fn policy_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.mesh.changes())
    }

    fn local_identity(&self) -> Option<String> {
        Some(self.identity.to_string())
    }

    fn tunnel_opened(&self, _target: SocketAddr, peer: &Identity, source: IpAddr) {
        self.stats.tcp.opened(&self.labels(peer, source));
    }

    fn tunnel_closed(
        &self,
        _target: SocketAddr,
        peer: &Identity,
        source: IpAddr,
        from_client: u64,
        to_client: u64,
    ) {
        self.stats
            .tcp
            .closed(&self.labels(peer, source), from_client, to_client);
    }

    fn connect(
        &self,
        target: SocketAddr,
        _peer: &Identity,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<AppStream>> + Send + '_>> {
        // The client's connection ended on its own node: its port is free here.
        Box::pin(self.app.dial(target, Some(client), PortChoice::ClientFirst))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What every connection of a pod shares.
struct PodContext {
    uid: PodUid,
    /// Set when the agent handed the pod over: it is then under policy even if the mesh file
    /// does not list it.
    handed: Option<HandedOver>,
    netns: Arc<Netns>,
    /// Inbound connections' dials to the app.
    app: Arc<AppDialer>,
    copy: CopyMode,
    stats: Arc<Stats>,
    /// The node's bounds; this pod's connections count under its netns inode.
    admission: Arc<Admission>,
    netns_inode: u64,
    mesh: Option<Arc<MeshContext>>,
    pod_mesh: Option<PodMesh>,
}

/// A served pod. Dropping it stops serving the pod.
pub struct PodProxy {
    uid: PodUid,
    /// The inode of the pod's netns: tells a re-sent pod from a recreated sandbox.
    netns_inode: u64,
    netns_ino: Option<u64>,
    accept_loops: JoinSet<()>,
    /// Flipped on drop: every connection task of the pod watches it.
    closing: watch::Sender<bool>,
    /// Flipped when the pod drains: HBONE connections send GOAWAY.
    draining: watch::Sender<bool>,
    /// Connections of the pod still open (captured ones and HBONE ones).
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one open connection for as long as it lives.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl PodProxy {
    /// Creates the pod's listeners inside its netns and starts accepting. When this returns the
    /// pod is ready: its 15006 listener is registered for eBPF steering when `sockets` is set.
    pub fn start(
        uid: PodUid,
        netns: Netns,
        handed: Option<HandedOver>,
        sockets: Option<&mut InboundSocketMap>,
        carry: &Carry,
        stats: Arc<Stats>,
        mesh: Option<Arc<MeshContext>>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let netns_inode = netns.inode().context("stat the pod's netns")?;
        let netns = Arc::new(netns);
        let app = Arc::new(AppDialer {
            netns: netns.clone(),
            dials: AppDials::new(carry.proxy_dials.clone(), netns_inode),
            preserve_source: carry.preserve_source,
            stats: stats.clone(),
        });
        let where_ = || format!("pod {uid} (netns {})", netns.path().display());
        let outbound4 = socket::listen_in(&netns, socket::outbound_v4(), false)
            .with_context(|| format!("listen on 0.0.0.0:{PORT_OUTBOUND} in {}", where_()))?;
        // IPv6 may be disabled in the pod; IPv4 capture still works then.
        let outbound6 = socket::listen_in(&netns, socket::outbound_v6(), false)
            .inspect_err(|e| debug!(pod = %uid, error = %e, "no IPv6 outbound listener"))
            .ok();
        let inbound = socket::listen_in(&netns, socket::inbound_any_v6(), true)
            .or_else(|_| socket::listen_in(&netns, socket::inbound_any_v4(), false))
            .with_context(|| format!("listen on :{PORT_INBOUND} in {}", where_()))?;
        let netns_ino = match sockets {
            Some(map) => Some(
                map.register(&inbound)
                    .with_context(|| format!("register the inbound listener of {}", where_()))?,
            ),
            None => None,
        };

        let (closing, _) = watch::channel(false);
        let (draining, _) = watch::channel(false);
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut accept_loops = JoinSet::new();
        let pod_mesh = match &mesh {
            Some(shared) => {
                let current = shared.mesh.current();
                match own_identity(&current, &uid, handed.as_ref()) {
                    Some(identity) => {
                        let identity = &identity;
                        let hbone = socket::listen_in(&netns, socket::hbone_any_v6(), true)
                            .with_context(|| format!("listen on :{PORT_HBONE} in {}", where_()))?;
                        let listener = Arc::new(hbone::Listener {
                            pod: netns_inode,
                            acceptor: tokio_rustls::TlsAcceptor::from(
                                shared.certs.server_config(identity).with_context(|| {
                                    format!("TLS for {identity} of {}", where_())
                                })?,
                            ),
                            trust_domain: current.trust_domain.clone(),
                            stats: shared.hbone.clone(),
                            admission: carry.admission.clone(),
                        });
                        let inbound = Arc::new(PodInbound {
                            uid: uid.clone(),
                            identity: identity.clone(),
                            handed: handed.clone(),
                            app: app.clone(),
                            mesh: shared.mesh.clone(),
                            stats: stats.clone(),
                        });
                        accept_loops.spawn(hbone_accept_loop(
                            hbone,
                            listener,
                            inbound,
                            Lifecycle {
                                closing: closing.subscribe(),
                                draining: draining.subscribe(),
                                active: active.clone(),
                            },
                        ));
                        let pool = Pool::for_node(
                            TlsDialer {
                                store: shared.certs.clone(),
                                tcp: Arc::new(PodTcp(netns.clone(), carry.admission.clone())),
                            },
                            shared.idle_timeout,
                            stats.pool_handshakes.clone(),
                            carry.admission.clone(),
                        );
                        info!(pod = %uid, identity = %identity, "pod meshed: HBONE on {PORT_HBONE}");
                        Some(PodMesh {
                            identity: identity.clone(),
                            pool,
                        })
                    }
                    None => None,
                }
            }
            None => None,
        };
        let ctx = Arc::new(PodContext {
            uid: uid.clone(),
            handed,
            netns,
            app,
            copy: carry.copy,
            stats,
            admission: carry.admission.clone(),
            netns_inode,
            mesh,
            pod_mesh,
        });
        let mut listeners = vec![
            (outbound4, Direction::Outbound),
            (inbound, Direction::Inbound),
        ];
        listeners.extend(outbound6.map(|l| (l, Direction::Outbound)));
        for (listener, direction) in listeners {
            accept_loops.spawn(accept_loop(
                listener,
                direction,
                ctx.clone(),
                closing.subscribe(),
                active.clone(),
            ));
        }
        info!(pod = %uid, netns_ino, "pod listeners up");
        Ok(Self {
            uid,
            netns_inode,
            netns_ino,
            accept_loops,
            closing,
            draining,
            active,
        })
    }

    /// Starts a graceful stop: the pod's listeners close (new connections are refused, inbound
    /// by the emptied socket map slot), HBONE connections send GOAWAY, and open connections
    /// carry on. [`PodProxy::stop`] ends whatever is left.
    pub fn begin_drain(&mut self, sockets: Option<&mut InboundSocketMap>) {
        if let (Some(map), Some(ino)) = (sockets, self.netns_ino.take())
            && let Err(e) = map.unregister(ino)
        {
            warn!(pod = %self.uid, error = %e, "unregister inbound listener");
        }
        self.accept_loops.abort_all();
        let _ = self.draining.send(true);
        info!(pod = %self.uid, open = self.active(), "pod draining");
    }

    /// The inode of the netns this pod is served in.
    pub fn netns_inode(&self) -> u64 {
        self.netns_inode
    }

    /// Connections of the pod still open.
    pub fn active(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops serving the pod and withdraws its eBPF registration.
    pub fn stop(mut self, sockets: Option<&mut InboundSocketMap>) {
        if let (Some(map), Some(cookie)) = (sockets, self.netns_ino)
            && let Err(e) = map.unregister(cookie)
        {
            warn!(pod = %self.uid, error = %e, "unregister inbound listener");
        }
        self.accept_loops.abort_all();
        let _ = self.closing.send(true);
        info!(pod = %self.uid, "pod stopped");
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        let _ = self.closing.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    direction: Direction,
    ctx: Arc<PodContext>,
    closing: watch::Receiver<bool>,
    active: Arc<std::sync::atomic::AtomicUsize>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %ctx.uid, direction = direction.as_str(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match ctx.admission.admit(ctx.netns_inode, peer.ip(), false) {
            Ok(permit) => permit,
            Err(refused) => {
                debug!(pod = %ctx.uid, direction = direction.as_str(), src = %canonical(peer), reason = refused.reason(), "connection refused");
                // RST: the client learns at once, and nothing lingers here.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        Stats::incr(&ctx.stats.accepted);
        let span = info_span!("conn", pod = %ctx.uid, direction = direction.as_str(), src = %canonical(peer));
        let mut closing = closing.clone();
        let ctx = ctx.clone();
        let open = Active::new(&active);
        tokio::spawn(
            async move {
                let _open = (open, permit);
                tokio::select! {
                    () = serve(stream, direction, &ctx) => {}
                    _ = closing.wait_for(|c| *c) => debug!("pod stopped; connection closed"),
                }
            }
            .instrument(span),
        );
    }
}

/// How a pod's connection tasks learn that the pod drains or stops, and count themselves.
struct Lifecycle {
    closing: watch::Receiver<bool>,
    draining: watch::Receiver<bool>,
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// Accepts HBONE connections for one pod; each runs until its client closes it or the pod stops.
async fn hbone_accept_loop(
    listener: TcpListener,
    server: Arc<hbone::Listener>,
    inbound: Arc<PodInbound>,
    lifecycle: Lifecycle,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(pod = %inbound.uid, error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let span = info_span!("hbone", pod = %inbound.uid, src = %canonical(peer));
        let (server, inbound) = (server.clone(), inbound.clone());
        let mut closing = lifecycle.closing.clone();
        let draining = lifecycle.draining.clone();
        let open = Active::new(&lifecycle.active);
        tokio::spawn(
            async move {
                let _open = open;
                tokio::select! {
                    () = hbone::accept(tcp, server, inbound, draining) => {}
                    _ = closing.wait_for(|c| *c) => debug!("pod stopped; HBONE connection closed"),
                }
            }
            .instrument(span),
        );
    }
}

/// Proxies one captured connection to where it was going. Every failure closes the
/// connection and is counted; nothing here panics on what the network sends.
async fn serve(mut client: TcpStream, direction: Direction, ctx: &PodContext) {
    let started = Instant::now();
    let stats = &ctx.stats;
    let dst = match destination(&client, direction) {
        Ok(dst) => dst,
        Err(e) => {
            Stats::incr(&stats.no_original_dst);
            warn!(error = %e, "no original destination; refusing (capture state missing?)");
            return;
        }
    };
    if direction == Direction::Inbound && is_own_port(dst.port()) {
        Stats::incr(&stats.loop_refused);
        warn!(dst = %dst, "destination is a proxy port; refusing to loop");
        return;
    }
    let source = client.peer_addr().map(canonical).ok();
    if direction == Direction::Inbound
        && let Some(src) = source
        && ctx.app.dials.is_own(src, dst)
    {
        // Capture took the proxy's own dial to the app (carrying a client's address) for
        // inbound traffic: serving it would dial again, and again.
        Stats::incr(&stats.loop_refused);
        warn!(src = %src, dst = %dst, "the proxy's own dial to the app was steered back to it; refusing to loop (is SLUICE_PROXY_DIALS in use by steer_inbound?)");
        reset(client);
        return;
    }
    let _ = client.set_nodelay(true);
    if direction == Direction::Outbound
        && let Some(shared) = &ctx.mesh
    {
        return serve_outbound_mesh(client, dst, ctx, shared, started).await;
    }
    // Plaintext inbound to a mesh workload: PeerAuthentication, then authorization.
    let policy = match (&ctx.mesh, direction, source) {
        (Some(shared), Direction::Inbound, Some(src)) => Some((shared, src)),
        _ => None,
    };
    if let Some((shared, src)) = policy
        && let Err(policy) = plaintext_allowed(&shared.mesh, ctx, src, dst)
    {
        Stats::incr(&stats.denied);
        info!(target: "access", dst = %dst, policy, "plaintext connection denied by policy; reset");
        reset(client);
        return;
    }
    // The upstream socket and the splice pipes are descriptors of the node's budget.
    let _fds = match ctx.admission.charge(PLAINTEXT_EXTRA_FDS) {
        Ok(fds) => fds,
        Err(refused) => {
            info!(dst = %dst, reason = refused.reason(), "no room for the upstream connection; reset");
            reset(client);
            return;
        }
    };
    let connected = match direction {
        // The client's tuple is held in this netns already (by the proxy's accepted socket or
        // by conntrack): any port but the client's.
        Direction::Inbound => ctx.app.dial(dst, source, PortChoice::NotClients).await,
        Direction::Outbound => socket::connect_in(&ctx.netns, dst)
            .await
            .map(AppStream::from),
    };
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            Stats::incr(&stats.upstream_connect_failed);
            info!(dst = %dst, error = %e, "upstream connect failed");
            return;
        }
    };
    let labels = plaintext_labels(direction, ctx, source);
    stats.tcp.opened(&labels);
    let result = match policy {
        Some((shared, src)) => tokio::select! {
            result = copy::bidirectional(ctx.copy, &mut client, &mut upstream.stream) => result,
            policy = plaintext_revoked(&shared.mesh, ctx, src, dst) => {
                Stats::incr(&stats.denied);
                stats.tcp.closed(&labels, 0, 0);
                info!(target: "access", dst = %dst, policy, "connection closed: a policy change denies it");
                reset(client);
                return;
            }
        },
        None => copy::bidirectional(ctx.copy, &mut client, &mut upstream.stream).await,
    };
    stats.count_copy(&result);
    let (to_server, to_client) = result.as_ref().map_or((0, 0), |c| *c);
    stats.tcp.closed(&labels, to_server, to_client);
    let own_identity = ctx.pod_mesh.as_ref().map(|p| p.identity.to_string());
    let (src_identity, dst_identity) = match direction {
        Direction::Inbound => (None, own_identity),
        Direction::Outbound => (own_identity, None),
    };
    Access {
        direction: direction.as_str(),
        src: source.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        dst: dst.to_string(),
        upstream: None,
        src_identity,
        dst_identity,
        hbone: false,
        started,
    }
    .closed(&result);
}

/// Outbound with the mesh on: through HBONE to meshed workloads (same node or not), directly to
/// the rest; a service VIP becomes one of its endpoints, and an endpoint that fails is retried
/// on the next before the client sees a failure.
async fn serve_outbound_mesh(
    mut client: TcpStream,
    dst: SocketAddr,
    ctx: &PodContext,
    shared: &MeshContext,
    started: Instant,
) {
    let stats = &ctx.stats;
    let mesh = shared.mesh.current();
    let plan = shared.balancer.plan(&mesh, dst, ctx.pod_mesh.is_some());
    let source = client.peer_addr().map(canonical).unwrap_or(dst);
    for Hop { target, via } in &plan.hops {
        let (target, via) = (*target, via.as_ref());
        let labels = outbound_labels(&mesh, ctx, target, via, plan.service.as_deref());
        let result = match (via, &ctx.pod_mesh) {
            (Some(dst_identity), Some(pod)) => {
                let key = PoolKey {
                    source: pod.identity.clone(),
                    destination: dst_identity.clone(),
                    addr: SocketAddr::new(target.ip(), PORT_HBONE),
                };
                let opened = tokio::select! {
                    opened = pod.pool.open(&key, target, source) => opened,
                    () = client_gone(&client) => {
                        // Dropping the open releases its stream slot, and its dial if it was
                        // the one dialling (the next caller for that peer dials afresh).
                        Stats::incr(&ctx.admission.stats.client_gone);
                        debug!(dst = %dst, upstream = %target, "the client went away while its tunnel was being opened");
                        return;
                    }
                };
                match opened {
                    Ok(mut tunnel) => {
                        Stats::incr(&stats.tunnelled);
                        stats.tcp.opened(&labels);
                        let copied = hbone::copy(&mut tunnel, &mut client)
                            .await
                            .map(|(from_tunnel, to_tunnel)| (to_tunnel, from_tunnel));
                        Ok((copied, Some(dst_identity)))
                    }
                    Err(PoolError::Open(OpenError::Status(StatusCode::UNAUTHORIZED))) => {
                        Stats::incr(&stats.denied);
                        info!(target: "access", dst = %dst, upstream = %target, peer_identity = %dst_identity, "connection denied by the destination's policy (401); reset");
                        reset(client);
                        return;
                    }
                    Err(e) => {
                        Stats::incr(&stats.tunnel_failed);
                        Err(e.to_string())
                    }
                }
            }
            _ => match connect_charged(ctx, target).await {
                Ok((mut upstream, _fds)) => {
                    stats.tcp.opened(&labels);
                    let copied = copy::bidirectional(ctx.copy, &mut client, &mut upstream).await;
                    Ok((copied, None))
                }
                Err(e) => {
                    Stats::incr(&stats.upstream_connect_failed);
                    Err(e.to_string())
                }
            },
        };
        let (copied, peer_identity) = match result {
            Ok(done) => done,
            Err(error) => {
                info!(dst = %dst, target = %target, error, "upstream failed; trying the next endpoint if any");
                if plan.service.is_some() {
                    shared.balancer.eject(target);
                }
                continue;
            }
        };
        stats.count_copy(&copied);
        let (to_server, to_client) = copied.as_ref().map_or((0, 0), |c| *c);
        stats.tcp.closed(&labels, to_server, to_client);
        Access {
            direction: "outbound",
            src: source.to_string(),
            dst: dst.to_string(),
            upstream: (target != dst).then(|| target.to_string()),
            src_identity: ctx.pod_mesh.as_ref().map(|p| p.identity.to_string()),
            dst_identity: peer_identity.map(ToString::to_string),
            hbone: peer_identity.is_some(),
            started,
        }
        .closed(&copied);
        return;
    }
    info!(target: "access", dst = %dst, service = plan.service.as_deref(), "connection refused: no upstream reachable");
}

/// A passthrough upstream connection from the pod's netns, its socket and splice pipes charged
/// to the node's descriptor budget first.
async fn connect_charged(
    ctx: &PodContext,
    target: SocketAddr,
) -> std::io::Result<(TcpStream, crate::limits::FdCharge)> {
    let fds = ctx
        .admission
        .charge(PLAINTEXT_EXTRA_FDS)
        .map_err(|refused| std::io::Error::other(refused.reason()))?;
    let upstream = socket::connect_in(&ctx.netns, target).await?;
    Ok((upstream, fds))
}

/// Resolves when the captured client resets its connection before sending anything; stays
/// pending once it has sent data or a FIN (the tunnel carries those).
async fn client_gone(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Err(_) => {}
        // Data, or a FIN: a client that half-closed may still read the answer, so only a
        // reset counts as gone.
        Ok(_) => std::future::pending().await,
    }
}

/// Istio's labels for a plaintext connection: inbound ones are reported by this (destination)
/// proxy with the pod as destination; outbound ones without a mesh know no workloads.
fn plaintext_labels(direction: Direction, ctx: &PodContext, source: Option<SocketAddr>) -> Labels {
    let reporter = match direction {
        Direction::Inbound => "destination",
        Direction::Outbound => "source",
    };
    let mut labels = Labels::new(reporter, "none");
    if let (Some(shared), Direction::Inbound) = (&ctx.mesh, direction) {
        let mesh = shared.mesh.current();
        set_destination(&mut labels, &mesh, ctx.uid.as_str());
        if let Some((w, _)) = source.and_then(|s| mesh.workload_at(s.ip())) {
            labels.source_workload = w.name.clone();
            labels.source_workload_namespace = w.namespace.clone();
        }
    }
    labels
}

/// Whether a plaintext connection from `src` may reach `dst` in the pod: refused under STRICT
/// mTLS, else authorized without an identity. Every pod the agent handed over is under policy
/// (see [`policy_target`]); only a pod served without an agent and missing from the mesh file
/// has none.
fn plaintext_allowed(
    mesh: &MeshWatch,
    ctx: &PodContext,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<(), String> {
    let mesh = mesh.current();
    let Some(target) = policy_target(&mesh, &ctx.uid, ctx.handed.as_ref())? else {
        return Ok(());
    };
    let mtls = mesh.policies.mtls(&target, dst.port());
    if mtls.mode == MtlsMode::Strict {
        return Err(format!("{} (PeerAuthentication STRICT)", mtls.policy));
    }
    let connection = Connection {
        source_ip: src.ip(),
        source: None,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
    };
    match mesh.policies.authorize(&target, &connection) {
        Verdict::Allow => Ok(()),
        Verdict::Deny { policy } => Err(policy),
    }
}

/// Resolves once a policy change denies a live plaintext connection.
async fn plaintext_revoked(
    mesh: &MeshWatch,
    ctx: &PodContext,
    src: SocketAddr,
    dst: SocketAddr,
) -> String {
    let mut changes = mesh.changes();
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(policy) = plaintext_allowed(mesh, ctx, src, dst) {
            return policy;
        }
    }
}

/// Closes a client connection with a reset (SO_LINGER 0): a denied client sees "connection
/// reset", as with Istio (curl exit 56), never a clean close that could pass for an answer.
fn reset(client: TcpStream) {
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
}

/// Istio's labels for an outbound connection of this pod, reported by its (source) proxy.
fn outbound_labels(
    mesh: &crate::mesh::Mesh,
    ctx: &PodContext,
    target: SocketAddr,
    via: Option<&Identity>,
    service: Option<&str>,
) -> Labels {
    let security = if via.is_some() { "mutual_tls" } else { "none" };
    let mut labels = Labels::new("source", security);
    if let Some((w, id)) = mesh.workload(ctx.uid.as_str()) {
        labels.source_workload = w.name.clone();
        labels.source_workload_namespace = w.namespace.clone();
        labels.source_principal = id.to_string();
    }
    if let Some((w, _)) = mesh.workload_at(target.ip()) {
        labels.destination_workload = w.name.clone();
        labels.destination_workload_namespace = w.namespace.clone();
    }
    labels.destination_principal = via.map_or_else(|| UNKNOWN.to_owned(), ToString::to_string);
    labels.destination_service = service.unwrap_or(UNKNOWN).to_owned();
    labels
}

fn destination(client: &TcpStream, direction: Direction) -> std::io::Result<SocketAddr> {
    let local = canonical(client.local_addr()?);
    match direction {
        Direction::Outbound => socket::original_dst(client),
        // sk_lookup keeps the original destination as the local address; an iptables
        // REDIRECT rewrites it to :15006 and conntrack remembers the original.
        Direction::Inbound if local.port() != PORT_INBOUND => Ok(local),
        Direction::Inbound => socket::original_dst(client),
    }
}

/// An inbound connection for one of the proxy's own ports would come straight back to it.
fn is_own_port(port: u16) -> bool {
    hbone::is_proxy_port(port)
}
