use super::pins::parse_pin;
use super::*;

#[test]
fn only_our_programs_count_as_link_pins() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    for n in [
        "mp_connect4-1",
        "mp_sock_ops-7",
        "mp_connect6-x",
        "other-3",
        "mp_guard_tc_if4-2",
        "mp_guard_tc_ifx-2",
    ] {
        fs::write(dir.join(n), b"").unwrap();
    }
    let mut gens: Vec<u64> = pinned_links(dir)
        .unwrap()
        .into_iter()
        .map(|(_, g, _)| g)
        .collect();
    gens.sort();
    assert_eq!(gens, vec![1, 2, 7]);
}

#[test]
fn each_pin_name_says_which_program_and_where() {
    assert_eq!(parse_pin("mp_l2_sockopt-3"), Some((3, Pin::Cgroup)));
    assert_eq!(parse_pin("mp_l2_socket-3"), Some((3, Pin::Cgroup)));
    assert_eq!(
        parse_pin("mp_guard_tc_if4-2"),
        Some((
            2,
            Pin::Tcx {
                prog: TcProg::Guard,
                ifindex: 4
            }
        ))
    );
    assert_eq!(
        parse_pin("mp_l2_deliver_if9-2"),
        Some((
            2,
            Pin::Tcx {
                prog: TcProg::Deliver,
                ifindex: 9
            }
        ))
    );
    assert_eq!(
        parse_pin("mp_l2_deliver_nl_if9_p49152_h1-5"),
        Some((
            5,
            Pin::Netlink {
                prog: TcProg::Deliver,
                ifindex: 9,
                priority: 49152,
                handle: 1
            }
        ))
    );
    assert_eq!(
        parse_pin("mp_guard_nl_if2_p1_h3-1"),
        Some((
            1,
            Pin::Netlink {
                prog: TcProg::Guard,
                ifindex: 2,
                priority: 1,
                handle: 3
            }
        ))
    );
    assert_eq!(parse_pin("mp_l2_deliver_ifx-1"), None);
}

#[test]
fn answer_pins_key_addresses_as_the_kernel_reads_them() {
    let v4 = peer_key("172.17.0.2".parse().unwrap());
    assert_eq!(v4.addr, [u32::from_ne_bytes([172, 17, 0, 2]), 0, 0, 0]);
    assert_eq!(v4.family, 2);
    // An IPv4-mapped peer is the IPv4 address on the wire.
    assert_eq!(peer_key("::ffff:172.17.0.2".parse().unwrap()), v4);
    let v6 = peer_key("fd00::2".parse().unwrap());
    assert_eq!(v6.family, 10);
    assert_eq!(v6.addr[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
    assert_eq!(v6.addr[3], u32::from_ne_bytes([0, 0, 0, 2]));
}

#[test]
fn pin_directories_others_can_write_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let me = nix::unistd::geteuid().as_raw();
    let base = tempfile::tempdir().unwrap();
    let pins = base.path().join("pins");
    let links = pins.join("links");
    fs::create_dir_all(&links).unwrap();
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    mode(base.path(), 0o755);
    mode(&pins, 0o700);
    mode(&links, 0o700);
    assert!(check_pin_dir(&pins, &[&links], me).is_ok());
    // Ours but too open (as an older version made it): closed.
    mode(&links, 0o755);
    assert!(check_pin_dir(&pins, &[&links], me).is_ok());
    assert_eq!(
        fs::metadata(&links).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Another owner: a local user made it first.
    assert!(check_pin_dir(&pins, &[&links], me + 1).is_err());
    // A world-writable parent: only with the sticky bit.
    mode(base.path(), 0o777);
    assert!(check_pin_dir(&pins, &[&links], me).is_err());
    mode(base.path(), 0o1777);
    assert!(check_pin_dir(&pins, &[&links], me).is_ok());
    mode(base.path(), 0o755);
}

#[test]
fn records_older_than_the_limit_are_refused() {
    let s = 1_000_000_000;
    assert!(check_age(100 * s, 100 * s).is_ok());
    assert!(check_age(100 * s, 105 * s).is_ok());
    let err = check_age(100 * s, 106 * s).unwrap_err();
    assert!(err.to_string().contains("6s old"), "{err}");
    // A clock that went backwards is not an old record.
    assert!(check_age(100 * s, 99 * s).is_ok());
}

#[test]
fn guard_pins_name_their_interface_and_filter() {
    assert_eq!(parse_pin("mp_guard_skb-3"), Some((3, Pin::Cgroup)));
    assert_eq!(
        parse_pin("mp_guard_tc_if12-3"),
        Some((
            3,
            Pin::Tcx {
                prog: TcProg::Guard,
                ifindex: 12
            }
        ))
    );
    assert_eq!(
        parse_pin("mp_guard_nl_if2_p49152_h1-4"),
        Some((
            4,
            Pin::Netlink {
                prog: TcProg::Guard,
                ifindex: 2,
                priority: 49152,
                handle: 1
            }
        ))
    );
    assert_eq!(parse_pin("mp_guard_nl_if2_p49152-4"), None);
    assert_eq!(parse_pin("mp_guard_tc_if-4"), None);
}

#[test]
fn an_upgrade_across_a_map_layout_unpins_the_old_layouts_maps_only() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    for (sub, pins) in [
        ("maps-v1", &["MP_SLOTS", "MP_CONNS"][..]),
        (MAPS_DIR, &["MP_SLOTS"][..]),
        (LINKS_DIR, &["mp_connect4-3"][..]),
        ("other", &["keep"][..]),
    ] {
        fs::create_dir(dir.join(sub)).unwrap();
        for p in pins {
            fs::write(dir.join(sub).join(p), b"").unwrap();
        }
    }
    // Planted: a link in an old layout's place, to a directory that is
    // not ours.
    let elsewhere = scratch.path().join("other");
    std::os::unix::fs::symlink(&elsewhere, dir.join("maps-v0")).unwrap();
    remove_old_maps(dir, MAPS_DIR).unwrap();
    assert!(!dir.join("maps-v1").exists());
    assert!(fs::symlink_metadata(dir.join("maps-v0")).is_err());
    for kept in [
        format!("{MAPS_DIR}/MP_SLOTS"),
        format!("{LINKS_DIR}/mp_connect4-3"),
        "other/keep".to_string(),
    ] {
        assert!(dir.join(&kept).exists(), "{kept} went");
    }
}
