//! The README's first command, as a test: the demo checks every outcome it shows (it fails when
//! sluice does not do it), and its report is checked again here.

use anyhow::{Result, ensure};
use sluice_capture::Backend;
use sluice_lab::demo::{Options, run};

pub fn the_demo_meshes_a_namespace_and_enforces_its_policy(backend: Backend) -> Result<()> {
    let report = run(Options {
        backend,
        keep: false,
    })?;
    ensure!(
        report.plain_payload_on_link && !report.hbone_payload_on_link,
        "only the unmeshed call may cross the node link in the clear: {report:?}"
    );
    ensure!(
        report.source_identity == "spiffe://cluster.local/ns/demo/sa/sleep"
            && report.destination_identity == "spiffe://cluster.local/ns/demo/sa/echo",
        "identities: {report:?}"
    );
    ensure!(report.notsleep_error.contains("reset"), "{report:?}");
    ensure!(report.opened_sleep_to_echo >= 2, "{report:?}");
    ensure!(
        report.echo_saw_tunnelled.starts_with("10.97.1."),
        "echo must see sleep's node-a address through the tunnel: {report:?}"
    );
    ensure!(
        report.echo_saw_probe.starts_with("169.254.7.127:"),
        "the kubelet probe must reach echo from Istio's probe address: {report:?}"
    );
    Ok(())
}
