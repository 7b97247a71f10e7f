//! Making sure the listen address exists on this host.
//!
//! The default listen address is link-local and usually assigned nowhere;
//! like the EKS Pod Identity Agent, the daemon assigns it itself, here to
//! `lo` (it works on kernels without dummy interfaces, and `lo` is in every
//! network namespace). The address stays when the daemon stops, so the
//! redirect keeps failing closed with "connection refused".

use std::{
    io,
    net::{IpAddr, SocketAddr},
    process::Command,
};

use tokio::net::TcpListener;

/// Binds `addr`, first adding its IP to `lo` if no interface has it.
pub async fn bind_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            add_to_loopback(addr.ip())?;
            tracing::info!(address = %addr.ip(), "assigned listen address to lo");
            Ok(TcpListener::bind(addr).await?)
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(anyhow::anyhow!(
            "binding {addr} was refused (EPERM): a bind guard from another metaproxy (another --pin-dir?) lets only its own cgroup take this address; stop it, or `metaproxy detach --pin-dir <its pin dir>`"
        )),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "{addr} is already in use: another metaproxy (or another service) listens there"
        )),
        other => Ok(other?),
    }
}

fn add_to_loopback(ip: IpAddr) -> anyhow::Result<()> {
    let (family, prefix, extra): (&str, u8, &[&str]) = match ip {
        IpAddr::V4(_) => ("-4", 32, &[]),
        // No duplicate address detection on lo: the address is usable at once.
        IpAddr::V6(_) => ("-6", 128, &["nodad"]),
    };
    let out = Command::new("ip")
        .args([
            family,
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "lo",
        ])
        .args(extra)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                anyhow::anyhow!("`ip` (iproute2) not found: assign {ip} to an interface by hand")
            }
            _ => anyhow::Error::new(e).context("running `ip addr add`"),
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "adding {ip} to lo failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
