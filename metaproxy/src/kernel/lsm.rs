//! Whether the BPF LSM is active: the layer-2 lock's socket hook runs only
//! where it is. The kernel lists its active LSMs in securityfs, which is
//! not always mounted; we mount it if need be (as systemd does at boot).

use std::{io, path::Path};

const SECURITYFS: &str = "/sys/kernel/security";
const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// `Ok` where the BPF LSM is active, else why the layer-2 lock's socket
/// hook cannot run here, in words for `status` and the log.
///
/// `METAPROXY_BPF_LSM=off` makes a host with the BPF LSM behave as one
/// without it, as `METAPROXY_GUARD_TC=netlink` does for tcx: the tests
/// use it to show what the other barriers hold on such kernels.
pub fn bpf_lsm() -> Result<(), String> {
    if std::env::var("METAPROXY_BPF_LSM").is_ok_and(|v| v == "off") {
        return Err("the BPF LSM is switched off (METAPROXY_BPF_LSM=off)".into());
    }
    let list = match std::fs::read_to_string(LSM_LIST) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            mount_securityfs().map_err(|e| {
                format!("cannot tell whether the BPF LSM is active: {LSM_LIST} is missing and mounting securityfs failed ({e})")
            })?;
            std::fs::read_to_string(LSM_LIST).map_err(|e| format!("cannot read {LSM_LIST}: {e}"))?
        }
        Err(e) => return Err(format!("cannot read {LSM_LIST}: {e}")),
    };
    bpf_in(&list)
}

/// The layer-2 lock's gap on this host, if it has one: why jobs can still
/// open packet sockets (`socket_hook`'s error), and, where 32-bit system
/// calls run, that the setsockopt half cannot see those either.
pub fn layer2_gap(socket_hook: Result<(), &str>) -> Option<String> {
    let why = socket_hook.err()?;
    Some(
        match compat_syscalls(
            std::path::Path::new("/proc/sys/abi/vsyscall32").exists(),
            &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
        ) {
            Some(compat) => format!("{why}; {compat}"),
            None => why.to_string(),
        },
    )
}

/// Why 32-bit system calls open a second way past tc egress, if they run:
/// the kernel runs cgroup/setsockopt programs for native calls only, so a
/// job holding a packet socket can set `PACKET_QDISC_BYPASS` (or AF_XDP
/// rings) through a 32-bit `setsockopt`. `ia32` says the kernel has IA32
/// emulation (`/proc/sys/abi/vsyscall32` exists); `cmdline` is the boot
/// command line, which can switch it off.
pub fn compat_syscalls(ia32: bool, cmdline: &str) -> Option<&'static str> {
    let off = cmdline
        .split_whitespace()
        .any(|arg| arg == "ia32_emulation=0" || arg == "ia32_emulation=false");
    (ia32 && !off).then_some(
        "32-bit system calls run here (IA32 emulation), and cgroup/setsockopt does not see them: a job with a packet socket can set PACKET_QDISC_BYPASS through one (boot with ia32_emulation=0, or give jobs a seccomp profile without the x86 architecture)",
    )
}

/// Whether `bpf` is among the comma-separated LSMs of `list`.
pub fn bpf_in(list: &str) -> Result<(), String> {
    let list = list.trim();
    if list.split(',').any(|lsm| lsm.trim() == "bpf") {
        Ok(())
    } else {
        Err(format!(
            "the BPF LSM is not active (active LSMs: {}): add bpf to the kernel's lsm= parameter",
            if list.is_empty() { "none" } else { list }
        ))
    }
}

fn mount_securityfs() -> nix::Result<()> {
    if !Path::new(SECURITYFS).exists() {
        return Err(nix::Error::ENOENT);
    }
    nix::mount::mount(
        Some("securityfs"),
        SECURITYFS,
        Some("securityfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

#[cfg(test)]
mod tests {
    use super::bpf_in;

    #[test]
    fn thirty_two_bit_calls_are_a_gap_unless_switched_off_at_boot() {
        use super::compat_syscalls;
        assert!(compat_syscalls(true, "BOOT_IMAGE=/vmlinuz root=/dev/sda1")
            .unwrap()
            .contains("ia32_emulation=0"));
        assert_eq!(
            compat_syscalls(true, "root=/dev/sda1 ia32_emulation=0"),
            None
        );
        assert_eq!(compat_syscalls(false, "root=/dev/sda1"), None);
    }

    #[test]
    fn bpf_must_be_in_the_list_as_a_whole_name() {
        assert!(bpf_in("lockdown,capability,landlock,bpf\n").is_ok());
        assert!(bpf_in("bpf").is_ok());
        let err = bpf_in("lockdown,capability,yama,selinux").unwrap_err();
        assert!(err.contains("lockdown,capability,yama,selinux"), "{err}");
        assert!(err.contains("lsm="), "{err}");
        assert!(bpf_in("capability,bpfilter").is_err());
        assert!(bpf_in("").unwrap_err().contains("none"));
    }
}
