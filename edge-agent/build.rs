//! Links the release agent with its start-up functions side by side.
//!
//! An idle agent's resident memory is mostly its own code: the kernel maps
//! the 64 KiB around each page a process touches, and start-up code spread
//! over the whole binary made most of it resident. `startup-order.txt`
//! (written by scripts/startup-order.sh) lists those functions, and lld
//! places them first (docs/PERFORMANCE.md, "Footprint"). A name the build
//! no longer has is skipped, so a stale list costs memory, never
//! correctness.
//!
//! Only for release builds on x86_64 Linux, where rustc links with its own
//! lld by default; `DCS_EDGE_SYMBOL_ORDER=off` leaves the option out for a
//! toolchain set up to link with another linker.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=startup-order.txt");
    println!("cargo::rerun-if-env-changed=DCS_EDGE_SYMBOL_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var("DCS_EDGE_SYMBOL_ORDER").is_ok_and(|v| v == "off");
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join("startup-order.txt");
    if release && lld_target && !off && list.exists() {
        println!(
            "cargo::rustc-link-arg-bin=dcs-edge=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo::rustc-link-arg-bin=dcs-edge=-Wl,--no-warn-symbol-ordering");
    }
}
