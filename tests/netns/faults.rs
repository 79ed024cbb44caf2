//! Fault scenarios on the lab of `scenarios.rs` (the agent with the ISP-edge example policy,
//! a real BIRD, real attackers): the agent killed with SIGKILL mid-incident and restarted,
//! the agent's nft table deleted by hand, BIRD restarted, and a broken policy reloaded. In
//! each, nothing decided is lost and enforcement carries on. (The spoofed-source event storm
//! during a scan is `tests/storm/`.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::common::{require_root, wait_for};
use crate::scenarios::{Attack, Lab, chosen, launch, probe_all, wait_held};

const SCAN: &str = "nmap TCP SYN scan";
const FLOOD: &str = "hping3 SYN flood";

fn lab_with(names: &[&str]) -> (Lab, Vec<Attack>) {
    crate::scenarios::require_lab_tools("the fault lab");
    let lab = Lab::new();
    let attacks = chosen(&lab, names);
    (lab, attacks)
}

/// The targets `list --json` shows, each once.
fn listed(lab: &Lab) -> Vec<String> {
    let v: Json = serde_json::from_str(&lab.cli(&["list", "--json"])).expect("list --json");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|b| b["target"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn flowspec_of_all(lab: &Lab, attacks: &[Attack], limit: Duration) {
    wait_for("every flowspec rule in BIRD", limit, || {
        let f = lab.flowspec();
        attacks.iter().all(|a| f.contains(a.flowspec)).then_some(())
    });
}

#[test]
fn fault_agent_killed_mid_incident_restarts_with_every_block_once() {
    if !require_root("fault_agent_killed_mid_incident_restarts_with_every_block_once") {
        return;
    }
    let (mut lab, attacks) = lab_with(&[SCAN, FLOOD]);
    let (_running, started) = launch(&lab, &attacks);
    // Killed as soon as the scanner is held, while the flood is still going on.
    wait_held(
        &mut lab,
        &attacks[..1],
        &started[..1],
        Duration::from_secs(60),
    );
    lab.agent.kill();
    // The kernel keeps enforcing what was decided.
    assert!(
        lab.sets()["quarantine4"].contains("203.0.113.10"),
        "the block went with the agent"
    );
    lab.restart();
    let restored = lab
        .agent
        .logged(&["state restored"], Duration::from_secs(5))
        .expect("restore logged");
    assert!(!restored.contains("restored=0"), "{restored}");
    // The flood is (still, or newly) held by the restarted agent.
    wait_held(&mut lab, &attacks, &started, Duration::from_secs(60));
    let mut targets = listed(&lab);
    targets.sort();
    assert_eq!(
        targets,
        ["203.0.113.10/32", "203.0.113.14/32"],
        "each block exactly once after the restart"
    );
    let sets = lab.sets();
    assert_eq!(
        sets["quarantine4"],
        BTreeSet::from(["203.0.113.10".to_owned()])
    );
    assert_eq!(
        sets["blocked4"],
        BTreeSet::from(["203.0.113.14".to_owned()])
    );
    assert_eq!(
        lab.blackholes().matches("203.0.113.14").count(),
        1,
        "{}",
        lab.blackholes()
    );
    // The BGP sessions died with the agent; the restarted one announces everything again.
    flowspec_of_all(&lab, &attacks, Duration::from_secs(30));
}

#[test]
fn fault_table_deleted_by_hand_is_back_within_a_second() {
    if !require_root("fault_table_deleted_by_hand_is_back_within_a_second") {
        return;
    }
    let (mut lab, attacks) = lab_with(&[SCAN]);
    let (_running, started) = launch(&lab, &attacks);
    wait_held(&mut lab, &attacks, &started, Duration::from_secs(60));
    lab.topo
        .router
        .run(&["nft", "delete", "table", "inet", "egressguard"])
        .expect("delete the table");
    let gone = Instant::now();
    let back = wait_for("the table repaired", Duration::from_secs(5), || {
        lab.sets()
            .get("quarantine4")
            .is_some_and(|s| s.contains("203.0.113.10"))
            .then(|| gone.elapsed())
    });
    eprintln!("table deleted by hand: back with its block in {back:?}");
    assert!(back < Duration::from_secs(1), "repair took {back:?}");
    lab.agent
        .logged(&["table written", "table missing"], Duration::from_secs(5))
        .expect("repair logged");
    // The quarantine holds again: the scanner reaches nothing but the walled garden.
    assert_eq!(probe_all(&lab, &attacks), [(true, false)]);
}

#[test]
fn fault_bird_restarted_gets_every_route_again() {
    if !require_root("fault_bird_restarted_gets_every_route_again") {
        return;
    }
    let (mut lab, attacks) = lab_with(&[SCAN, FLOOD]);
    let (_running, started) = launch(&lab, &attacks);
    wait_held(&mut lab, &attacks, &started, Duration::from_secs(60));
    flowspec_of_all(&lab, &attacks, Duration::from_secs(10));
    let states = |lab: &Lab| -> Vec<String> {
        let v: Json = serde_json::from_str(&lab.cli(&["status", "--json"])).expect("status");
        v["bgp"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(states(&lab), ["established", "established"]);
    lab.bird.stop();
    // The agent sees both sessions go (BIRD's CEASE) and says so in `status`.
    wait_for("sessions down in status", Duration::from_secs(30), || {
        let s = states(&lab);
        (s.len() == 2 && s.iter().all(|p| p != "established")).then_some(())
    });
    // Local enforcement does not depend on the peers.
    let sets = lab.sets();
    assert!(sets["quarantine4"].contains("203.0.113.10"));
    assert!(sets["blocked4"].contains("203.0.113.14"));
    let upstream = &lab.upstream;
    lab.bird.start(upstream);
    flowspec_of_all(&lab, &attacks, Duration::from_secs(40));
    assert_eq!(states(&lab), ["established", "established"]);
    let rtbh = wait_for("RTBH again", Duration::from_secs(20), || {
        let o = lab
            .bird
            .birdc("show route table master4 203.0.113.14/32 all");
        o.contains("(65535,666)").then_some(o)
    });
    assert!(rtbh.contains("(64496,666)"), "{rtbh}");
}

#[test]
fn fault_broken_policy_reload_is_refused_and_the_old_one_keeps_working() {
    if !require_root("fault_broken_policy_reload_is_refused_and_the_old_one_keeps_working") {
        return;
    }
    let (mut lab, attacks) = lab_with(&[SCAN, "nmap TCP connect scan"]);
    let (_first, started) = launch(&lab, &attacks[..1]);
    wait_held(&mut lab, &attacks[..1], &started, Duration::from_secs(60));
    let status = |lab: &Lab| -> Json {
        serde_json::from_str(&lab.cli(&["status", "--json"])).expect("status --json")
    };
    let version = status(&lab)["policy_version"].clone();

    let path = lab.dir.path().join("policy.yaml");
    let good = std::fs::read_to_string(&path).expect("policy");
    let broken = good.replacen("mode: enforce", "mode: enforce\nnetworks: [oops", 1);
    std::fs::write(&path, broken).expect("write broken policy");
    let out = lab.agent.cli(&crate::common::agent_bin(), &["reload"]);
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a broken policy was accepted: {err}");
    assert!(
        err.contains("policy.yaml:"),
        "the refusal does not name the file and line: {err}"
    );
    lab.agent
        .logged(&["policy.yaml:"], Duration::from_secs(5))
        .expect("refusal logged");
    assert_eq!(status(&lab)["policy_version"], version, "policy changed");
    assert!(lab.sets()["quarantine4"].contains("203.0.113.10"));

    // The old policy keeps detecting and enforcing.
    let (_second, started) = launch(&lab, &attacks[1..]);
    wait_held(&mut lab, &attacks[1..], &started, Duration::from_secs(60));
    flowspec_of_all(&lab, &attacks, Duration::from_secs(10));
}
