//! `/proc/self/mountinfo` and `/proc/self/cgroup`, parsed: where cgroup2
//! is mounted (never hard-coded: hybrid hosts mount it at
//! /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup), where the v1
//! hierarchies are, and which cgroup2 directory a process is in. Shared by
//! the daemon and its test bed so both read the host the same way.

extern crate std;

use std::{path::PathBuf, string::String, vec::Vec};

/// The mount point of the first cgroup2 filesystem in `mountinfo`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mounts_of(mountinfo, "cgroup2").next()
}

/// The mount points of the cgroup v1 hierarchies (none on pure v2 hosts).
pub fn cgroup1_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mounts_of(mountinfo, "cgroup").collect()
}

/// The cgroup2 path (`/a/b`, below the mount) in a `/proc/PID/cgroup` text.
pub fn own_cgroup2(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn mounts_of<'a>(mountinfo: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mountinfo.lines().filter_map(move |line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != fstype {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup1_mounts(mountinfo),
            [PathBuf::from("/sys/fs/cgroup/cpu")]
        );
    }

    #[test]
    fn pure_v2_host_and_escaped_paths() {
        let mountinfo = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let odd = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(odd), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(cgroup2_mount("30 1 0:26 / /x rw - tmpfs t rw\n"), None);
        assert!(cgroup1_mounts(mountinfo).is_empty());
    }

    #[test]
    fn own_cgroup_is_the_v2_line() {
        let text = "12:cpu:/docker/x\n0::/system.slice/metaproxy.service\n";
        assert_eq!(own_cgroup2(text), Some("/system.slice/metaproxy.service"));
        assert_eq!(own_cgroup2("1:name=systemd:/\n"), None);
    }
}
