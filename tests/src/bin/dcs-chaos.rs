//! Long-running fault scenarios (soak): the same scenarios as `tests/faults.rs`,
//! for as long as you like.
//!
//! `cargo run -p dcs-tests --bin dcs-chaos -- --scenario partition --duration 10m`

use std::process::ExitCode;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!(
        "usage: dcs-chaos --scenario NAME [--duration 10m] [--records 1000000]\nscenarios: {}",
        dcs_tests::chaos::SCENARIOS.join(", ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut scenario = None;
    let mut duration = Duration::from_secs(600);
    let mut records = 1_000_000usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = it.next();
        match (arg.as_str(), value) {
            ("--scenario", Some(v)) => scenario = Some(v.clone()),
            ("--duration", Some(v)) => match humantime::parse_duration(v) {
                Ok(d) => duration = d,
                Err(e) => {
                    eprintln!("--duration {v:?}: {e}");
                    return usage();
                }
            },
            ("--records", Some(v)) => match v.parse() {
                Ok(n) => records = n,
                Err(e) => {
                    eprintln!("--records {v:?}: {e}");
                    return usage();
                }
            },
            _ => return usage(),
        }
    }
    let Some(scenario) = scenario else {
        return usage();
    };
    if !dcs_tests::chaos::SCENARIOS.contains(&scenario.as_str()) {
        eprintln!("unknown scenario {scenario:?}");
        return usage();
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reports = runtime.block_on(dcs_tests::chaos::run_named(&scenario, duration, records));
    let mut ok = true;
    for r in &reports {
        println!("{r}");
        ok &= r.ok();
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
