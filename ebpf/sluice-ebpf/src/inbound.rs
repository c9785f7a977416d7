//! Inbound steering: an sk_lookup program on each enrolled pod's netns hands every TCP SYN that
//! arrives from outside the pod to the proxy's 15006 listener in that pod.
//!
//! The loader loads one instance per pod, whose own `SLUICE_POD_SELF` map (not pinned, so each
//! load makes a fresh one) holds that pod's key (sk_lookup has no helper that names the netns
//! it runs in, and an attach cookie is newer than Linux 5.10). The instance therefore steers by *where it runs*, not by the destination
//! address: whatever address a connection is for (one the node assigned, a link-local one, one
//! the pod added itself), it goes to this pod's proxy socket or is dropped. Nothing that reaches
//! the pod's netns from outside can pass to the app around the proxy, and no pod can claim
//! another pod's inbound traffic by adding that pod's address to its own interfaces.

use aya_ebpf::bindings::{sk_action::SK_DROP, sk_action::SK_PASS};
use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use sluice_common::{
    AF_INET, AF_INET6, DialKey, PORT_HBONE, PROBE_SOURCE_V4, PROBE_SOURCE_V6, Verdict,
};

use crate::addr::{is_loopback4, is_loopback6, key4, key6};
use crate::maps::{POD_CONFIG, POD_SELF, PROXY_DIALS, PROXY_INBOUND, count};

const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// The IPv6 probe address as the four network-byte-order words sk_lookup presents.
#[inline(always)]
fn probe6() -> [u32; 4] {
    let b = PROBE_SOURCE_V6;
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let verdict = steer(&ctx);
    count(verdict);
    match verdict {
        Verdict::InboundDropNoProxy | Verdict::InboundDropAssign => SK_DROP,
        _ => SK_PASS,
    }
}

fn steer(ctx: &SkLookupContext) -> Verdict {
    // SAFETY: the kernel passes a valid, readable context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return Verdict::InboundPassNotTcp;
    }
    // This instance's pod; an instance loaded for no pod (the node-wide object's, never
    // attached) has none.
    let Some(pod) = POD_SELF.get(0).copied() else {
        return Verdict::InboundPassNotPod;
    };
    if pod.netns_ino == 0 {
        return Verdict::InboundPassNotPod;
    }
    // sk_lookup's ports: local in host byte order, remote in network byte order (a 2-byte
    // load, which every kernel with sk_lookup allows).
    let port = lookup.local_port as u16;
    let remote_port = u16::from_be(lookup.remote_port);
    // What passes to the app uncaptured:
    // - connections made inside the pod: loopback, and source = destination address (the app
    //   talking to itself on its own address; the proxy's dial when it does not carry the
    //   client's address). Over IPv4 nothing from outside can carry the pod's own address as
    //   source (the kernel drops it as a martian before the lookup); over IPv6 a neighbour's
    //   spoofed SYN can, but its handshake cannot complete: the SYN-ACK goes to the pod itself.
    //   (`ingress_ifindex` cannot tell instead: it came in Linux 5.17, and for a pod's own
    //   address the kernel reports the interface that owns it, not `lo`.)
    // - the node's probes, from Istio's probe address (`probe.rs`), as Istio's in-pod rules do.
    // - the proxy's own dial to the app carrying the client's address: exactly the tuple the
    //   proxy registered in `PROXY_DIALS` (which no pod can write) just before connecting.
    let (remote, local) = match lookup.family {
        AF_INET => {
            if is_loopback4(lookup.local_ip4) || lookup.remote_ip4 == lookup.local_ip4 {
                return Verdict::InboundPassLocal;
            }
            if lookup.remote_ip4 == u32::from_ne_bytes(PROBE_SOURCE_V4) {
                return Verdict::InboundPassNodeProbe;
            }
            (key4(lookup.remote_ip4), key4(lookup.local_ip4))
        }
        AF_INET6 => {
            if is_loopback6(lookup.local_ip6) || lookup.remote_ip6 == lookup.local_ip6 {
                return Verdict::InboundPassLocal;
            }
            if lookup.remote_ip6 == probe6() {
                return Verdict::InboundPassNodeProbe;
            }
            (key6(lookup.remote_ip6), key6(lookup.local_ip6))
        }
        _ => return Verdict::InboundPassNotTcp,
    };
    if port == PORT_HBONE {
        return Verdict::InboundPassPort;
    }
    // SAFETY: map values are valid while the program runs; PodConfig is plain data.
    if let Some(config) = unsafe { POD_CONFIG.get(pod) }
        && config.excludes_inbound(port)
    {
        return Verdict::InboundPassPort;
    }
    let dial = DialKey {
        pod,
        remote,
        local,
        remote_port,
        local_port: port,
        _pad: 0,
    };
    // SAFETY: map values are valid while the program runs.
    if let Some(deadline) = unsafe { PROXY_DIALS.get(dial) }.copied() {
        // SAFETY: bpf_ktime_get_ns is allowed for every program type.
        if unsafe { bpf_ktime_get_ns() } < deadline {
            return Verdict::InboundPassProxyDial;
        }
    }
    // A missing proxy socket (proxy down or not yet ready for this pod) refuses the connection:
    // inbound traffic to a captured pod never reaches the app around the proxy.
    match PROXY_INBOUND.redirect_sk_lookup(ctx, pod, 0) {
        Ok(()) => Verdict::InboundSteered,
        Err(e) if e == -ENOENT => Verdict::InboundDropNoProxy,
        Err(_) => Verdict::InboundDropAssign,
    }
}
