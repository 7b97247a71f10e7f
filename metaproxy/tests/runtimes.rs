//! Docker and Podman side by side, in-process: a container is looked up in
//! the runtime its cgroup's shape names (`libpod-<id>` is Podman's), and
//! only there; a runtime metaproxy does not follow gets nothing, and is
//! never taken for a host process.

mod support;

use support::{bed, bed_with, with_role};

const ROLE: &str = "ci-deploy";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const PODMAN: [&str; 2] = ["--podman-host", "unix:///run/podman/podman.sock"];

#[tokio::test]
async fn podmans_containers_and_dockers_get_their_roles_side_by_side() {
    let bed = bed_with(&PODMAN).await;
    let in_podman = bed.podman_container(1, with_role());
    let in_docker = bed.container(2, with_role());
    for who in [&in_podman, &in_docker] {
        let a = bed
            .request(who, "GET", &format!("{CREDS}{ROLE}"), &[])
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json()["Code"], "Success");
    }
    assert_eq!(
        bed.podman
            .as_ref()
            .unwrap()
            .inspects
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        bed.runtime
            .inspects
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(bed.last_log().container.as_deref(), Some("job-2"));
}

#[tokio::test]
async fn a_cgroup_is_looked_up_only_in_the_runtime_its_shape_names() {
    let bed = bed_with(&PODMAN).await;
    let docker_job = bed.container(1, with_role());
    let podman_job = bed.podman_container(2, with_role());
    let (docker_id, podman_id) = (
        docker_job.container.clone().unwrap(),
        podman_job.container.clone().unwrap(),
    );
    // A cgroup shaped as Podman's, named after Docker's container (and the
    // reverse): the runtime that shape names does not know it.
    for path in [
        format!("/machine.slice/libpod-{docker_id}.scope"),
        format!("/docker/{podman_id}"),
        format!("/system.slice/docker-{podman_id}.scope"),
    ] {
        let forged = bed.process_at(&path, "sh");
        let a = bed
            .request(&forged, "GET", &format!("{CREDS}{ROLE}"), &[])
            .await;
        assert_eq!(a.status, 403, "{path}: {a:?}");
        let reason = bed.last_log().reason.unwrap();
        assert!(reason.contains("does not know"), "{path}: {reason}");
    }
    // Named after a Podman container, in the right shape but elsewhere.
    let elsewhere = bed.process_at(&format!("/evil/libpod-{podman_id}.scope"), "sh");
    assert_eq!(bed.request(&elsewhere, "GET", CREDS, &[]).await.status, 403);
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .contains("which does not run there"));
    assert_eq!(bed.sts.calls(), 0);
}

#[tokio::test]
async fn a_container_of_a_runtime_not_followed_is_refused_not_a_host_process() {
    // The default: Docker alone.
    let bed = bed().await;
    let podman_id = support::container_id(7);
    for path in [
        format!("/machine.slice/libpod-{podman_id}.scope"),
        format!("/kubepods/cri-containerd-{podman_id}.scope"),
    ] {
        let who = bed.process_at(&path, "aws");
        let a = bed.request(&who, "GET", CREDS, &[]).await;
        assert_eq!(a.status, 403, "{path}: {a:?}");
        let reason = bed.last_log().reason.unwrap();
        assert!(
            reason.contains("of a container runtime metaproxy does not follow (it follows Docker)"),
            "{reason}"
        );
        // Not forwarded to the real IMDS as a host process would be.
        assert!(bed.upstream.forwards.lock().unwrap().is_empty());
    }
}

#[tokio::test]
async fn an_admins_lookup_that_two_runtimes_answer_is_refused_not_guessed() {
    let bed = bed_with(&PODMAN).await;
    // The same id in both: which one `policy explain` meant is not known.
    bed.container(1, with_role());
    bed.podman_container(1, with_role());
    let id = support::container_id(1).to_string();
    let err = bed.identities.find(&id).await.unwrap_err().to_string();
    assert!(err.contains("more than one runtime"), "{err}");
    // Known to one runtime only: found.
    bed.podman_container(2, with_role());
    let two = support::container_id(2).to_string();
    let found = bed.identities.find(&two).await.unwrap().unwrap();
    assert_eq!(found.name, "job-2");
}
