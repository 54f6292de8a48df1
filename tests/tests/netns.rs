//! Scenario 5 of the fault suite: the partition done at the network layer.
//! Agent and aggregator run in separate Linux network namespaces joined by a
//! veth pair; the link is set down and up again, then impaired with `tc netem`
//! (10 % loss, 200 ms delay) or, where the kernel has no netem, a `tbf` rate
//! limit. Needs root; skipped with the reason otherwise, and failed under `CI=true`. Prints
//! `scenario=netns-partition acked=N in_pg=M missing=0 duplicated=0 refused=R`.

use std::time::Duration;

use dcs_tests::chaos::Plan;
use dcs_tests::netns::{self, NetPair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_veth_link_cut_then_impaired_between_namespaces_loses_and_doubles_nothing() {
    if let Err(reason) = NetPair::available() {
        dcs_tests::skip("netns partition", &reason.to_string());
        return;
    }
    let plan = Plan::with_duration(Duration::from_secs(30));
    match netns::netns_partition(plan, Duration::from_secs(8), Duration::from_secs(8)).await {
        Ok(report) => report.assert_ok(),
        Err(reason) => dcs_tests::skip("netns partition", &reason.to_string()),
    }
}

#[test]
fn a_net_pair_is_deleted_with_its_interfaces_even_when_the_test_panics() {
    if let Err(reason) = NetPair::available() {
        dcs_tests::skip("netns clean-up", &reason.to_string());
        return;
    }
    let names = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let pair = NetPair::new().expect("create a net pair");
        *names.lock().unwrap() = Some((
            pair.agent_ns.clone(),
            pair.aggregator_ns.clone(),
            pair.agent_uplink.root_if.clone(),
            pair.aggregator_uplink.root_if.clone(),
        ));
        pair.link_down();
        panic!("deliberate panic (expected): the pair must still be deleted");
    });
    assert!(outcome.is_err());
    let (a, g, a_up, g_up) = names.into_inner().unwrap().expect("the pair was created");
    let listed = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let namespaces = listed(&["netns", "list"]);
    assert!(
        !namespaces.contains(&a) && !namespaces.contains(&g),
        "{namespaces}"
    );
    let links = listed(&["-o", "link", "show"]);
    assert!(
        !links.contains(&format!("{a_up}@")) && !links.contains(&format!("{g_up}@")),
        "{links}"
    );
}
