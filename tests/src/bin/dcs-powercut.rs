//! Power-cut scenarios in a qemu VM (`dcs_tests::powercut`); run by
//! `scripts/powercut.sh`, which builds the guest image first.
//!
//! `dcs-powercut --image DIR [--scenario NAME|all] [--records 20000] [--work DIR]`
//!
//! Prints one `scenario=...` line per scenario and exits non-zero when one
//! lost or doubled an acknowledged record (the opt-in `process-crash` mode
//! only fails on a doubled one: its loss is what it reports).

use std::path::PathBuf;
use std::process::ExitCode;

use dcs_tests::powercut::{self, Image, Options, SCENARIOS};

fn usage() -> ExitCode {
    eprintln!(
        "usage: dcs-powercut --image DIR [--scenario NAME|all] [--records N] [--work DIR] [--memory MIB]\nscenarios: {}",
        SCENARIOS.join(", ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut image = None;
    let mut scenarios: Vec<String> = Vec::new();
    let mut records = 20_000usize;
    let mut work = std::env::temp_dir();
    let mut memory_mib = 1024u32;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(value) = it.next() else {
            return usage();
        };
        match arg.as_str() {
            "--image" => image = Some(PathBuf::from(value)),
            "--scenario" if value == "all" => {
                scenarios.extend(SCENARIOS.iter().map(|s| s.to_string()))
            }
            "--scenario" if SCENARIOS.contains(&value.as_str()) => scenarios.push(value.clone()),
            "--records" => match value.parse() {
                Ok(n) => records = n,
                Err(_) => return usage(),
            },
            "--memory" => match value.parse() {
                Ok(n) => memory_mib = n,
                Err(_) => return usage(),
            },
            "--work" => work = PathBuf::from(value),
            _ => return usage(),
        }
    }
    let Some(image) = image else {
        return usage();
    };
    if scenarios.is_empty() {
        scenarios.extend(SCENARIOS.iter().map(|s| s.to_string()));
    }
    let image = match Image::at(&image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("dcs-powercut: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let guest_script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("powercut/guest.sh");
    let opts = Options {
        image,
        work,
        records,
        guest_script,
        memory_mib,
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut ok = true;
    for name in &scenarios {
        match runtime.block_on(powercut::run_named(name, &opts)) {
            Ok(report) => {
                println!("{report}");
                if !powercut::passes(name, &report) {
                    eprintln!("dcs-powercut: {name} FAILED");
                    ok = false;
                }
            }
            Err(e) => {
                println!("scenario={name} error");
                eprintln!("dcs-powercut: {name}: {e:#}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
