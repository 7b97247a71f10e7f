//! A record waits on its slot for its own connection: another job that
//! guesses the slot reaches the daemon, is refused, and leaves the record
//! for its owner.

use std::{process::Command, time::Duration};

use metaproxy_tests::bed::{E2eBed, ROLE_DEPLOY};

use crate::{assert_real_imds_untouched, CREDS};

/// Runs `args` in the network namespace of the process `pid`.
fn in_netns(pid: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn another_job_on_a_guessed_pending_slot_is_refused_and_the_owner_still_gets_its_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    let victim = bed
        .container(
            "victim",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let attacker = bed
        .container("attacker", bed.base_image(), &[], &[])
        .unwrap();
    // In the host's network namespace, its connections come from a host
    // address, as a relay's do: it must not pass for one.
    let host_net = bed
        .container("host-net", bed.base_image(), &[], &["--network", "host"])
        .unwrap();
    let pid = bed
        .dockerd
        .docker(&["inspect", "-f", "{{.State.Pid}}", "victim"])
        .unwrap();
    // Hold the victim's SYNs back, so its record waits on its slot.
    let hold = [
        "OUTPUT",
        "-p",
        "tcp",
        "--syn",
        "-d",
        "169.254.170.254",
        "-j",
        "DROP",
    ];
    let mut add = vec!["iptables", "-A"];
    add.extend_from_slice(&hold);
    in_netns(&pid, &add);

    std::thread::scope(|s| {
        let owner = s.spawn(|| victim.imds("GET", CREDS, &[]));
        // The slot the redirect gave the victim's connect.
        let slot = metaproxy_tests::wait_for("the victim's SYN", Duration::from_secs(5), || {
            let ss = in_netns(&pid, &["ss", "-Htn", "state", "syn-sent"]);
            ss.split_whitespace()
                .find_map(|a| a.strip_prefix("169.254.170.254:"))
                .map(str::to_string)
        })
        .unwrap();
        let slot: u16 = slot.parse().unwrap();
        assert!((16_384..=32_767).contains(&slot), "slot {slot}");

        // Control: a slot with nothing pending on it leads nowhere.
        let empty = if slot == 16_384 { slot + 1 } else { slot - 1 };
        let nowhere = attacker.raw(&format!("169.254.170.254:{empty}"), "GET", CREDS, &[]);
        assert_eq!(nowhere["errno"], libc::ECONNREFUSED, "{nowhere}");

        // The guess: it reaches the daemon and the victim's record, and is
        // refused; the record stays.
        let guessed = attacker.raw(&format!("169.254.170.254:{slot}"), "GET", CREDS, &[]);
        assert_eq!(guessed["status"], 403, "{guessed}");
        assert!(
            !guessed["body"]
                .as_str()
                .unwrap_or_default()
                .contains(ROLE_DEPLOY),
            "{guessed}"
        );
        let refused = bed.daemon.connections().unwrap().into_iter().any(|c| {
            c["reason"]
                .as_str()
                .is_some_and(|r| r.contains("pending on this slot is another's"))
        });
        assert!(refused, "{:#?}", bed.daemon.connections().unwrap());
        let from_host = host_net.raw(&format!("169.254.170.254:{slot}"), "GET", CREDS, &[]);
        assert_eq!(from_host["status"], 403, "{from_host}");
        let refusals = bed.daemon.connections().unwrap().into_iter().filter(|c| {
            c["reason"]
                .as_str()
                .is_some_and(|r| r.contains("pending on this slot is another's"))
        });
        assert_eq!(
            refusals.count(),
            2,
            "{:#?}",
            bed.daemon.connections().unwrap()
        );
        assert_eq!(bed.daemon.status().unwrap()["maps"]["slots"], 1);

        // Let the victim's SYN through: its connection takes its record.
        let mut del = vec!["iptables", "-D"];
        del.extend_from_slice(&hold);
        in_netns(&pid, &del);
        let got = owner.join().unwrap();
        assert_eq!(got["status"], 200, "{got}");
        assert_eq!(got["body"], ROLE_DEPLOY, "{got}");
    });
    assert_real_imds_untouched(&bed);
}

#[test]
fn a_connection_forged_from_the_victims_own_address_onto_its_slot_is_refused() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::Stdio;

    let bed = E2eBed::start(&[]).expect("bed");
    let victim = bed
        .container(
            "raw-victim",
            bed.base_image(),
            &[("IAM_ROLE", ROLE_DEPLOY)],
            &[],
        )
        .unwrap();
    let _attacker = bed
        .container("raw-attacker", bed.base_image(), &[], &[])
        .unwrap();
    let pid = bed
        .dockerd
        .docker(&["inspect", "-f", "{{.State.Pid}}", "raw-victim"])
        .unwrap();
    let victim_ip = bed
        .dockerd
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            "raw-victim",
        ])
        .unwrap();
    // The attacker (NET_RAW, as Docker leaves it) poisons the host's
    // neighbour entry for the victim, then waits for the slot.
    let mut attack = Command::new("docker")
        .args(["-H", &bed.dockerd.host(), "exec", "-i", "raw-attacker"])
        .args(["/mp-attack", "claim", "--iface", "eth0", "--victim"])
        .args([victim_ip.trim(), "--dst", "169.254.170.254", "--path"])
        .arg(format!("{CREDS}{ROLE_DEPLOY}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mp-attack claim");
    let mut out = BufReader::new(attack.stdout.take().unwrap());
    let mut poisoned = String::new();
    out.read_line(&mut poisoned).unwrap();
    assert!(poisoned.contains("poisoned"), "{poisoned}");

    let hold = [
        "OUTPUT",
        "-p",
        "tcp",
        "--syn",
        "-d",
        "169.254.170.254",
        "-j",
        "DROP",
    ];
    let mut add = vec!["iptables", "-A"];
    add.extend_from_slice(&hold);
    in_netns(&pid, &add);
    std::thread::scope(|s| {
        let owner = s.spawn(|| victim.imds("GET", CREDS, &[]));
        let slot = metaproxy_tests::wait_for("the victim's SYN", Duration::from_secs(5), || {
            let ss = in_netns(&pid, &["ss", "-Htn", "state", "syn-sent"]);
            ss.split_whitespace()
                .find_map(|a| a.strip_prefix("169.254.170.254:"))
                .map(str::to_string)
        })
        .unwrap();
        let mut stdin = attack.stdin.take().unwrap();
        writeln!(stdin, "{slot}").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let _ = attack.wait();
        let got: serde_json::Value = serde_json::from_str(&line).expect(&line);
        // The forgery works up to the daemon: the handshake from the
        // victim's address completed on the victim's slot, and the answer
        // came back to the attacker. It is a refusal, and the record stays.
        assert_eq!(got["connected"], true, "{got}");
        assert_eq!(got["status"], 403, "{got}\n{}", bed.daemon.log());
        assert_eq!(got["saw_credentials"], false, "{got}");
        let conns = bed.daemon.connections().unwrap();
        assert!(
            conns.iter().any(|c| c["client"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{}:", victim_ip.trim())))
                && c["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("pending on this slot is another's"))),
            "{conns:#?}"
        );
        assert_eq!(bed.daemon.status().unwrap()["maps"]["slots"], 1);

        // The poisoned entry would hold the victim's own answers back for
        // seconds more: forget it, then let the victim's SYN through.
        let ns = bed.ns.path();
        let flush = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ip", "neigh", "flush", "to", victim_ip.trim()])
            .status()
            .unwrap();
        assert!(flush.success());
        let mut del = vec!["iptables", "-D"];
        del.extend_from_slice(&hold);
        in_netns(&pid, &del);
        let got = owner.join().unwrap();
        assert_eq!(got["status"], 200, "{got}");
        assert_eq!(got["body"], ROLE_DEPLOY, "{got}");
    });
    assert_real_imds_untouched(&bed);
}
