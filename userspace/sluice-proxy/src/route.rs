//! Where an outbound connection goes: the mesh decides between an HBONE tunnel and plain
//! passthrough, and spreads service traffic over the service's endpoints.
//!
//! Load balancing: round robin from one counter per proxy over the service's endpoints, skipping
//! endpoints that refused a connection in the last [`EJECT_FOR`] (they are tried last when
//! nothing else is left). The caller tries the candidates in order, so an endpoint that refuses
//! is retried on the next before the client sees a failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::identity::Identity;
use crate::mesh::{Mesh, Protocol};

/// How long an endpoint that refused stays at the back of the line.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// One way to reach the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The app address to reach (a workload's `ip:port`).
    pub target: SocketAddr,
    /// `Some(identity)`: through HBONE to `target.ip:15008`, whose proxy must present it.
    pub via: Option<Identity>,
}

/// Where a connection goes, in the order to try.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub hops: Vec<Hop>,
    /// The service's hostname when `dst` was a service VIP.
    pub service: Option<String>,
}

#[derive(Default)]
pub struct Balancer {
    next: AtomicUsize,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// Plans `dst` against `mesh`. With `meshed_source` false (the pod has no mesh identity)
    /// every hop is direct: there is no certificate to present.
    pub fn plan(&self, mesh: &Mesh, dst: SocketAddr, meshed_source: bool) -> Plan {
        let hop = |target: SocketAddr| {
            let via = mesh
                .workload_at(target.ip())
                .filter(|(w, _)| meshed_source && w.protocol == Protocol::Hbone)
                .map(|(_, id)| id.clone());
            Hop { target, via }
        };
        let Some((service, endpoints)) = mesh.service_at(dst) else {
            return Plan {
                hops: vec![hop(dst)],
                service: None,
            };
        };
        let mut order: Vec<SocketAddr> = Vec::with_capacity(endpoints.len());
        if !endpoints.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
            order.extend(endpoints[start..].iter().chain(&endpoints[..start]));
        }
        let now = Instant::now();
        let ejected = self
            .ejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let is_ejected = |a: &SocketAddr| ejected.get(a).is_some_and(|until| *until > now);
        // Stable partition: healthy endpoints in round-robin order, then the ejected ones.
        let (healthy, sick): (Vec<_>, Vec<_>) = order.into_iter().partition(|a| !is_ejected(a));
        Plan {
            hops: healthy.into_iter().chain(sick).map(hop).collect(),
            service: Some(service.hostname.clone()),
        }
    }

    /// Records that `target` refused a connection.
    pub fn eject(&self, target: SocketAddr) {
        self.ejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(target, Instant::now() + EJECT_FOR);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MESH: &str = "\
workloads:
  - {uid: a, name: a, namespace: default, serviceAccount: client, ips: [10.0.0.1], protocol: HBONE}
  - {uid: b1, name: b1, namespace: default, serviceAccount: server, ips: [10.0.1.1], protocol: HBONE}
  - {uid: b2, name: b2, namespace: default, serviceAccount: server, ips: [10.0.1.2], protocol: HBONE}
  - {uid: c, name: c, namespace: legacy, serviceAccount: default, ips: [10.0.2.1], protocol: TCP}
services:
  - {hostname: server.default.svc.cluster.local, vips: [10.96.0.1], ports: {80: 8080}, endpoints: [b1, b2]}
";

    fn mesh() -> Mesh {
        Mesh::parse(Path::new("t.yaml"), MESH).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn meshed_workloads_go_through_hbone_others_direct() {
        let (mesh, lb) = (mesh(), Balancer::default());
        let plan = lb.plan(&mesh, addr("10.0.1.1:8080"), true);
        assert_eq!(plan.hops.len(), 1);
        assert_eq!(
            plan.hops[0]
                .via
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/server")
        );
        assert_eq!(lb.plan(&mesh, addr("10.0.2.1:80"), true).hops[0].via, None);
        assert_eq!(
            lb.plan(&mesh, addr("192.0.2.1:443"), true).hops[0].via,
            None
        );
        assert_eq!(
            lb.plan(&mesh, addr("10.0.1.1:8080"), false).hops[0].via,
            None,
            "a source without identity cannot tunnel"
        );
    }

    #[test]
    fn services_round_robin_and_refusing_endpoints_go_last() {
        let (mesh, lb) = (mesh(), Balancer::default());
        let first: Vec<SocketAddr> = (0..4)
            .map(|_| lb.plan(&mesh, addr("10.96.0.1:80"), true).hops[0].target)
            .collect();
        assert_eq!(
            first,
            [
                addr("10.0.1.1:8080"),
                addr("10.0.1.2:8080"),
                addr("10.0.1.1:8080"),
                addr("10.0.1.2:8080")
            ]
        );
        let plan = lb.plan(&mesh, addr("10.96.0.1:80"), true);
        assert_eq!(
            plan.service.as_deref(),
            Some("server.default.svc.cluster.local")
        );
        assert_eq!(plan.hops.len(), 2, "every endpoint is a candidate");
        lb.eject(addr("10.0.1.1:8080"));
        for _ in 0..3 {
            let plan = lb.plan(&mesh, addr("10.96.0.1:80"), true);
            let targets: Vec<_> = plan.hops.iter().map(|h| h.target).collect();
            assert_eq!(targets, [addr("10.0.1.2:8080"), addr("10.0.1.1:8080")]);
        }
    }
}
