//! Builds the eBPF object (ebpf/sluice-ebpf) with the nightly toolchain and bpf-linker, so a plain
//! `cargo build` on stable produces everything. `cargo xtask setup` installs what this needs.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "sluice-ebpf")
        .ok_or_else(|| anyhow!("sluice-ebpf is not in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("sluice-ebpf's manifest has no parent dir"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object failed; run `cargo xtask setup` to install bpf-linker and nightly rust-src")
}
