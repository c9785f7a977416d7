//! End-to-end tests: real network namespaces, real capture (eBPF and iptables), the real proxy
//! binary, real processes as workloads. Needs root; run with `cargo xtask test`.
//!
//! Every scenario runs once per capture backend: the `ebpf` and `iptables` modules below are
//! generated from the same list, so the two backends are held to the same behaviour.

mod agent;
mod bpf;
mod capture;
mod cleanup;
mod demo;
mod hostile;
mod hostile_peers;
mod mesh;
mod policy;
mod source;
mod zds;

/// Fails loudly (never skips) when the tests cannot do their job.
fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests need root (netns, cgroups, BPF); run `sudo cargo xtask test`"
    );
    sluice_lab::app::set_binary(env!("CARGO_BIN_EXE_sluice-lab"));
}

/// Generates `ebpf::<scenario>` and `iptables::<scenario>` tests for scenarios of `$module`.
macro_rules! for_both_backends {
    ($module:ident: $($scenario:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $scenario() { crate::require_root(); crate::$module::$scenario(sluice_capture::Backend::Ebpf).unwrap(); })*
        }
        mod iptables {
            $(#[test] fn $scenario() { crate::require_root(); crate::$module::$scenario(sluice_capture::Backend::Iptables).unwrap(); })*
        }
    };
}

for_both_backends!(capture:
    inbound_to_any_port_reaches_the_app_through_the_proxy,
    outbound_reaches_the_server_through_the_proxy_and_the_app_sees_the_real_peer,
    clients_in_container_cgroups_are_captured,
    hbone_port_and_loopback_are_not_captured,
    excluded_ports_are_not_captured,
    proxy_stopped_refuses_traffic_and_restarted_proxy_serves_it_again,
    loader_restart_keeps_capture_and_adopts_the_pod,
    enrol_twice_and_remove_unknown_succeed,
    release_restores_direct_traffic_and_leaves_nothing_behind,
    ipv6_is_captured_both_ways,
);

/// The mesh scenarios need two nodes each.
mod hbone {
    for_both_backends!(mesh:
        captured_clients_reach_meshed_pods_through_hbone,
        a_terminated_proxy_drains_then_exits,
    );
}

/// Authorization and PeerAuthentication at the destination proxy, across two nodes.
mod authz {
    for_both_backends!(policy:
        authorization_and_peer_authentication_are_enforced_at_the_destination,
        metrics_config_dump_and_readiness_show_what_the_proxy_does,
    );
}

/// What apps and kubelet see: the client's own address at the app, kubelet's probes under
/// STRICT and allow-nothing (and no pod passing for one).
mod what_apps_see {
    for_both_backends!(source:
        kubelet_probes_reach_the_app_under_strict_and_allow_nothing,
        apps_see_the_clients_own_address,
        without_source_preservation_the_app_sees_the_pods_own_address,
    );
}

/// Hostile pods on the same node: address claims, spoofed sources, link-local and later-added
/// addresses, connect storms. Each attack fails, the victim is unaffected, the refusal is named.
mod hostile_pod {
    for_both_backends!(hostile:
        a_pod_cannot_claim_another_pods_addresses,
        a_spoofed_source_cannot_redirect_another_pods_connections,
        link_local_and_later_added_addresses_are_captured,
        a_connect_storm_cannot_evict_another_pods_capture,
        a_connection_flood_is_refused_at_the_proxys_per_source_bound,
    );
}

/// The proxy driven over ZDS by the test acting as the agent.
mod handoff {
    for_both_backends!(zds: the_agent_hands_pods_to_the_proxy_over_zds);
}

/// `cargo xtask demo`, run as a test: two nodes with agents and proxies, a namespace meshed by
/// its label, HBONE with identities, the getting-started policy, metrics.
mod main_job {
    for_both_backends!(demo: the_demo_meshes_a_namespace_and_enforces_its_policy);
}

/// The node agent with the CNI chain, the pods file and restarts (one node each).
mod node_agent {
    for_both_backends!(agent:
        the_agent_keeps_kubelet_probes_exempt_from_capture,
        a_pod_started_through_the_cni_chain_runs_only_once_captured_and_served,
        labelling_a_namespace_meshes_its_running_pods_and_unlabelling_releases_them,
        an_agent_restart_adopts_its_pods_without_disturbing_live_traffic,
        a_proxy_restart_keeps_capture_fails_closed_then_resumes,
        a_pod_that_cannot_be_captured_is_retried_and_keeps_the_agent_unready,
        in_kubernetes_mode_labelling_a_namespace_meshes_and_marks_its_pods,
        a_pod_claiming_another_pods_address_is_refused,
        a_del_without_pod_arguments_releases_the_pod,
        a_restarted_sandbox_is_captured_even_in_the_released_netns_inode,
        a_selected_pod_running_uncaptured_makes_the_agent_unready,
    );
}

/// Hostile peers of the proxy: plaintext into a handed-over pod the mesh file does not list,
/// HBONE CONNECTs to the proxy's ports, other addresses and loopback, an impostor on the agent's
/// socket, an `add` carrying the node's netns.
mod hostile_peer {
    for_both_backends!(hostile_peers:
        plaintext_to_a_handed_over_pod_missing_from_the_mesh_file_is_refused_under_strict_and_allow_only,
        hbone_connects_to_proxy_ports_other_addresses_and_loopback_get_400,
        the_proxy_refuses_an_agent_socket_whose_listener_is_not_root,
        the_proxy_refuses_an_add_carrying_the_nodes_own_netns,
    );
}
