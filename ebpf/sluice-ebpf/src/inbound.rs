//! Inbound steering: an sk_lookup program on each enrolled pod's netns hands TCP SYNs for the
//! pod's addresses to the proxy's 15006 listener in that pod.

use aya_ebpf::bindings::{sk_action::SK_DROP, sk_action::SK_PASS};
use aya_ebpf::macros::sk_lookup;
use aya_ebpf::programs::SkLookupContext;
use sluice_common::{AF_INET, AF_INET6, PORT_HBONE, Verdict};

use crate::addr::{key4, key6};
use crate::maps::{POD_ADDRS, POD_CONFIG, PROXY_INBOUND, count};

const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

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
        return Verdict::InboundPassNotPod;
    }
    // A connection whose source is the destination address itself was made inside the pod:
    // the proxy's own connection to the app, or the app talking to itself. Capturing it would
    // loop. Nothing from outside can carry the pod's address as source: the kernel drops such
    // packets as martians. (`ingress_ifindex` cannot tell: for a pod's own address the kernel
    // reports the interface that owns it, not `lo`.)
    let key = match lookup.family {
        AF_INET if lookup.remote_ip4 == lookup.local_ip4 => return Verdict::InboundPassLocal,
        AF_INET6 if lookup.remote_ip6 == lookup.local_ip6 => return Verdict::InboundPassLocal,
        AF_INET => key4(lookup.local_ip4),
        AF_INET6 => key6(lookup.local_ip6),
        _ => return Verdict::InboundPassNotPod,
    };
    // SAFETY: map values are valid while the program runs; PodKey is plain data.
    let Some(pod) = (unsafe { POD_ADDRS.get(key) }).copied() else {
        return Verdict::InboundPassNotPod;
    };
    // sk_lookup's local_port is in host byte order.
    let port = lookup.local_port as u16;
    if port == PORT_HBONE {
        return Verdict::InboundPassPort;
    }
    // SAFETY: as above.
    if let Some(config) = unsafe { POD_CONFIG.get(pod) }
        && config.excludes_inbound(port)
    {
        return Verdict::InboundPassPort;
    }
    // A missing proxy socket (proxy down or not yet ready for this pod) refuses the connection:
    // inbound traffic to a captured pod never reaches the app around the proxy.
    match PROXY_INBOUND.redirect_sk_lookup(ctx, pod, 0) {
        Ok(()) => Verdict::InboundSteered,
        Err(e) if e == -ENOENT => Verdict::InboundDropNoProxy,
        Err(_) => Verdict::InboundDropAssign,
    }
}
