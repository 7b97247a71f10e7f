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
