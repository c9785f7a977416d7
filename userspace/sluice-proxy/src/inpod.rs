//! One enrolled pod as the proxy sees it: listeners inside the pod's netns and the connections
//! accepted on them.
//!
//! Invariants:
//! - every socket of a pod (listeners and upstream connections) is created in the pod's netns,
//!   so traffic leaves with the pod's own address and routes;
//! - the proxy never runs in the pod's cgroup, so eBPF capture never sees its sockets, and it
//!   marks them 0x539 so the iptables rules let them through: no loops;
//! - dropping a `PodProxy` closes its listeners (the kernel removes the 15006 socket from the
//!   eBPF socket map, so new inbound connections are refused) and ends its connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use sluice_capture::inbound_map::InboundSocketMap;
use sluice_capture::netns::Netns;
use sluice_capture::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND, PodUid};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::copy::{self, CopyMode};
use crate::socket::{self, canonical};
use crate::stats::Stats;

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
    netns: Netns,
    copy: CopyMode,
    stats: Arc<Stats>,
}

/// A served pod. Dropping it stops serving the pod.
pub struct PodProxy {
    uid: PodUid,
    netns_ino: Option<u64>,
    accept_loops: JoinSet<()>,
    /// Flipped on drop: every connection task of the pod watches it.
    closing: watch::Sender<bool>,
}

impl PodProxy {
    /// Creates the pod's listeners inside its netns and starts accepting. When this returns the
    /// pod is ready: its 15006 listener is registered for eBPF steering when `sockets` is set.
    pub fn start(
        uid: PodUid,
        netns: Netns,
        sockets: Option<&mut InboundSocketMap>,
        copy: CopyMode,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
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
        let ctx = Arc::new(PodContext {
            uid: uid.clone(),
            netns,
            copy,
            stats,
        });
        let mut accept_loops = JoinSet::new();
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
            ));
        }
        info!(pod = %uid, netns_ino, "pod listeners up");
        Ok(Self {
            uid,
            netns_ino,
            accept_loops,
            closing,
        })
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
        Stats::incr(&ctx.stats.accepted);
        let span = info_span!("conn", pod = %ctx.uid, direction = direction.as_str(), src = %canonical(peer));
        let mut closing = closing.clone();
        let ctx = ctx.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = serve(stream, direction, &ctx) => {}
                    _ = closing.wait_for(|c| *c) => debug!("pod stopped; connection closed"),
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
    let _ = client.set_nodelay(true);
    let mut upstream = match socket::connect_in(&ctx.netns, dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            Stats::incr(&stats.upstream_connect_failed);
            info!(dst = %dst, error = %e, "upstream connect failed");
            return;
        }
    };
    let result = copy::bidirectional(ctx.copy, &mut client, &mut upstream).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((sent, received)) => {
            Stats::incr(&stats.completed);
            stats
                .bytes_out
                .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
            stats
                .bytes_in
                .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
            info!(target: "access", dst = %dst, bytes_sent = sent, bytes_received = received, duration_ms, "connection closed");
        }
        Err(e) => {
            Stats::incr(&stats.copy_failed);
            info!(target: "access", dst = %dst, duration_ms, error = %e, "connection failed");
        }
    }
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
    port == PORT_OUTBOUND || port == PORT_INBOUND || port == PORT_HBONE
}
