use super::*;

#[test]
fn only_our_programs_count_as_link_pins() {
    let dir = std::env::temp_dir().join(format!("mp-links-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
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
    let mut gens: Vec<u64> = pinned_links(&dir)
        .unwrap()
        .into_iter()
        .map(|(_, g, _)| g)
        .collect();
    gens.sort();
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(gens, vec![1, 2, 7]);
}

#[test]
fn pin_directories_others_can_write_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let me = nix::unistd::geteuid().as_raw();
    let base = std::env::temp_dir().join(format!("mp-pins-{}", std::process::id()));
    let pins = base.join("pins");
    let links = pins.join("links");
    fs::create_dir_all(&links).unwrap();
    let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    mode(&base, 0o755);
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
    mode(&base, 0o777);
    assert!(check_pin_dir(&pins, &[&links], me).is_err());
    mode(&base, 0o1777);
    assert!(check_pin_dir(&pins, &[&links], me).is_ok());
    mode(&base, 0o755);
    fs::remove_dir_all(&base).unwrap();
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
        Some((3, Pin::Tcx { ifindex: 12 }))
    );
    assert_eq!(
        parse_pin("mp_guard_nl_if2_p49152_h1-4"),
        Some((
            4,
            Pin::Netlink {
                ifindex: 2,
                priority: 49152,
                handle: 1
            }
        ))
    );
    assert_eq!(parse_pin("mp_guard_nl_if2_p49152-4"), None);
    assert_eq!(parse_pin("mp_guard_tc_if-4"), None);
}
