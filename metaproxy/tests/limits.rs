//! Fair shares, in-process: one job (all its containers together), or all
//! host callers together, cannot take every connection, and no connection
//! keeps its place forever.

mod support;

use std::time::Duration;

use metaproxy::server::MAX_REQUESTS;
use support::{bed_with, with_role, Spec};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
use metaproxy::model::gitlab::JOB_LABEL as JOB;

/// Whether the server closed `stream` without a byte.
async fn closed_at_once(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0)
        == 0
}

#[tokio::test]
async fn the_containers_of_one_job_share_one_budget() {
    let bed = bed_with(&[
        "--max-connections",
        "64",
        "--max-connections-per-container",
        "2",
    ])
    .await;
    // A build container and a service container of job 77 (services get
    // the job's label too), and another job.
    let job = || Spec {
        labels: &[(JOB, "77")],
        ..with_role()
    };
    let build = bed.container(1, job());
    let service = bed.container(2, job());
    let other = bed.container(3, with_role());
    let _held = [bed.connect(&build).await, bed.connect(&service).await];
    support::until("both held connections taken in", || bed.count.open() == 2).await;
    let mut third = bed.connect(&service).await;
    assert!(closed_at_once(&mut third).await, "job 77 is over its share");
    assert_eq!(bed.request(&other, "GET", CREDS, &[]).await.status, 200);
}

#[tokio::test]
async fn host_callers_share_one_budget_whatever_their_cgroups() {
    let bed = bed_with(&[
        "--max-connections",
        "64",
        "--max-connections-per-container",
        "2",
        "--allow-host-cgroup",
        "/system.slice/**",
    ])
    .await;
    // Each `systemd-run --user --scope` is a cgroup of its own.
    let scopes: Vec<_> = (0..3)
        .map(|n| bed.process_at(&format!("/system.slice/run-u{n}.scope"), "sh"))
        .collect();
    let _held = [bed.connect(&scopes[0]).await, bed.connect(&scopes[1]).await];
    support::until("both held connections taken in", || bed.count.open() == 2).await;
    let mut third = bed.connect(&scopes[2]).await;
    assert!(
        closed_at_once(&mut third).await,
        "host callers are over their share"
    );
    let job = bed.container(1, with_role());
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 200);
}

#[tokio::test]
async fn a_connection_carries_a_bounded_number_of_requests() {
    let bed = bed_with(&[]).await;
    let job = bed.container(1, with_role());
    let mut stream = bed.connect(&job).await;
    let request = format!("GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
    let mut answered = 0;
    let mut buf = vec![0u8; 4096];
    for _ in 0..MAX_REQUESTS + 5 {
        if stream.write_all(request.as_bytes()).await.is_err() {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .expect("an answer or a close")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        answered += 1;
    }
    assert_eq!(answered, MAX_REQUESTS, "then the connection is closed");
}
