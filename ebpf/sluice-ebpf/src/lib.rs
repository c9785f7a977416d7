// Empty library target: lets sluice-capture list this crate as a build dependency so cargo
// rebuilds the eBPF object when these sources change. The programs are in main.rs.
#![no_std]
