//! The disaster-recovery drill (`dcs_tests::drill`): pgBackRest backup,
//! destruction, point-in-time restore, replay; run by `scripts/dr-drill.sh`,
//! which installs pgBackRest first.
//!
//! `dcs-drill [--records 20000]`
//!
//! Prints `scenario=pitr-restore acked=N in_pg=M missing=0 duplicated=0 ...
//! rto_s=T` and exits non-zero when a record is missing or doubled.

use std::process::ExitCode;

use dcs_tests::drill::{self, Options};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut records = 20_000usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match (arg.as_str(), it.next().map(|v| v.parse::<usize>())) {
            ("--records", Some(Ok(n))) if n >= 2 => records = n,
            _ => {
                eprintln!("usage: dcs-drill [--records N]");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(drill::run(&Options { records })) {
        Ok(report) => {
            println!("{report}");
            dcs_tests::chaos::log_scenario(&report.to_string());
            if report.ok() && report.acked > 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("dcs-drill: FAILED");
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("dcs-drill: {error:#}");
            ExitCode::FAILURE
        }
    }
}
