//! `sluice-cni`: the chained CNI plugin the container runtime runs for every pod sandbox. See
//! the library's documentation for what it does.

use std::io::{Read, Write};
use std::process::ExitCode;

use sluice_cni::plugin::{Output, run};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // VERSION may be called without stdin; an unreadable stdin is reported by the parser.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let output = run(|name| std::env::var(name).ok(), &stdin);
    let (value, code) = match output {
        Output::Result(v) => (Some(v), ExitCode::SUCCESS),
        Output::Nothing => (None, ExitCode::SUCCESS),
        Output::Error(v) => (Some(v), ExitCode::FAILURE),
    };
    if let Some(value) = value {
        let mut stdout = std::io::stdout().lock();
        // Nothing useful can be done if the runtime closed our stdout.
        let _ = writeln!(stdout, "{value}");
    }
    code
}
