//! A real network partition: three daemons in their own network namespaces
//! on a bridge (private 10.213.0.0/24 addresses inside namespaces this test
//! creates and removes), each configured like the shipped example:
//! `listen = "0.0.0.0:7400"` with `advertise` set to its own address (before
//! `advertise` existed, nodes advertised the wildcard and never met). Cutting one replica's link makes SWIM declare it
//! dead while the rest of the fleet moves on; healing it brings it back and
//! it catches up with what changed meanwhile, without operator action.
//!
//! Needs root and iproute2 (`scripts/test` installs iproute2); CI runs as
//! root.

use std::fs;
use std::process::Command;

mod common;
use common::{Daemon, converge, ctl_json, until};

/// Namespaces, bridge and veth pairs of one test; removed on drop.
struct Net {
    tag: String,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A bridge and `n` namespaces, namespace i at 10.213.0.(i+1)/24.
    fn new(n: usize) -> Net {
        let tag = format!("{:x}", std::process::id() & 0xffff);
        let mut net = Net {
            tag: tag.clone(),
            namespaces: Vec::new(),
        };
        let br = format!("sdbr{tag}");
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["link", "set", &br, "up"]);
        for i in 0..n {
            let ns = format!("sd{tag}n{i}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (host, inner) = (net.host_end(i), format!("sd{tag}i{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &host, "master", &br]);
            ip(&["link", "set", &host, "up"]);
            ip(&["link", "set", &inner, "netns", &ns]);
            let addr = format!("10.213.0.{}/24", i + 1);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn host_end(&self, i: usize) -> String {
        format!("sd{}h{i}", self.tag)
    }

    /// Cuts (or restores) node i's link to the bridge.
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_end(i),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and with it the pair.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("sdbr{}", self.tag)])
            .status();
    }
}

use common::peer_state as state_of;

#[test]
fn a_partitioned_replica_is_declared_dead_and_catches_up_when_healed() {
    let net = Net::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = ("10.213.0.1", "10.213.0.2", "10.213.0.3");
    let ns = &net.namespaces;
    // Daemons are declared after `net`, so they are killed before the
    // namespaces are removed.
    let src = Daemon::in_netns(tmp.path(), "src", &ns[0], a, "source", &[b, c]);
    fs::write(src.data.join("before.txt"), b"before the partition").unwrap();
    let r1 = Daemon::in_netns(tmp.path(), "r1", &ns[1], b, "replica", &[a]);
    let r2 = Daemon::in_netns(tmp.path(), "r2", &ns[2], c, "replica", &[a]);
    converge(&src, &[&r1, &r2], "before the partition");
    until(30, "r1 sees r2 alive", || {
        (state_of(&r1, "r2") == "alive").then_some(())
    });

    net.link(2, false);
    fs::write(src.data.join("during.txt"), b"written during the partition").unwrap();
    fs::remove_file(src.data.join("before.txt")).unwrap();
    converge(&src, &[&r1], "the connected replica");
    until(60, "SWIM declares the cut-off replica dead", || {
        (state_of(&r1, "r2") == "dead" && state_of(&src, "r2") == "dead").then_some(())
    });
    // Still cut off: it has the old content, and says it is alone.
    assert!(r2.data.join("before.txt").exists());
    assert!(!r2.data.join("during.txt").exists());
    let alone = until(60, "r2 sees no live peer", || {
        let s = ctl_json(&r2, &["status"]);
        (s["peers"]["alive"] == 0).then_some(s)
    });
    assert_eq!(alone["dirs"][0]["state"], "idle");

    net.link(2, true);
    converge(&src, &[&r1, &r2], "after healing");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(state_of(&r1, "r2") == "alive" && state_of(&src, "r2") == "alive") {
        if std::time::Instant::now() > deadline {
            for d in [&src, &r1, &r2] {
                let log = fs::read_to_string(&d.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("membership")).collect();
                eprintln!("--- {} membership log:\n{}", d.name, lines.join("\n"));
            }
            panic!("r2 is not alive again for the others within 60 s of healing");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
