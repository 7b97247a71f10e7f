//! Connections found by their slot: the source was translated on the way
//! (an inner dockerd's MASQUERADE, a user-space relay), so only the port
//! the redirect sent the connect to ties them to its record. They take the
//! record only from an address of the record's container; any other
//! connection on that slot is refused and leaves the record for its owner.

mod support;

use support::{bed, with_role};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const SLOT: u16 = 50_001;

#[tokio::test]
async fn a_translated_connection_from_its_container_gets_the_role_and_takes_the_record() {
    let bed = bed().await;
    let service = bed.container(1, with_role());
    let job = bed.inner_container(&service, 7);
    let a = bed.request_translated(Some(&job), SLOT, CREDS).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "ci-deploy");
    assert!(!bed.records.pending(SLOT), "the record is taken");
    // Taken: the same slot serves no second connection.
    let again = bed.request_translated(None, SLOT, CREDS).await;
    assert_eq!(again.status, 403);
}

#[tokio::test]
async fn another_address_on_a_pending_slot_is_refused_and_leaves_the_record() {
    let bed = bed().await;
    let service = bed.container(1, with_role());
    let victim = bed.inner_container(&service, 7);
    let id = service.container.clone().unwrap();
    // The victim job's only address is not the one the connection comes
    // from (127.0.0.1): as another job guessing the victim's slot would
    // look.
    bed.runtime
        .containers
        .lock()
        .unwrap()
        .get_mut(&id)
        .unwrap()
        .addresses = Some(vec!["172.17.0.9".parse().unwrap()]);
    let a = bed.request_translated(Some(&victim), SLOT, CREDS).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(!a.body.contains("ci-deploy"));
    assert!(
        bed.records.pending(SLOT),
        "a refused claim must not consume the victim's record"
    );
    assert!(
        bed.answers.pinned.lock().unwrap().is_empty(),
        "nothing was pinned"
    );
}

#[tokio::test]
async fn a_containers_own_record_is_not_claimed_by_translation_even_from_its_address() {
    let bed = bed().await;
    // Nothing translates a job container's own connects on their way to
    // the host: a connection from its address that did not find the
    // record by its 4-tuple was forged (raw packets from the job's
    // address, the answers read by poisoning the host's ARP entry).
    let job = bed.container(1, with_role());
    let a = bed.request_translated(Some(&job), SLOT, CREDS).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(bed.records.pending(SLOT), "the record stays for its owner");
    // Control: the same connection, for an inner container of that job,
    // is what NAT in the job makes, and is served.
    let inner = bed.inner_container(&job, 7);
    let b = bed.request_translated(Some(&inner), SLOT + 1, CREDS).await;
    assert_eq!(b.status, 200, "{}", b.body);
}

#[tokio::test]
async fn a_build_step_of_an_inner_dockerd_is_nested_and_the_containers_own_process_is_not() {
    let bed = bed().await;
    let service = bed.container(1, with_role());
    // BuildKit's RUN steps have no container id of their own.
    let step = bed.process_below(&service, "/docker/buildkit/x7q2m9k1p0z8y3w6v5u4t3s2r");
    let a = bed.request_translated(Some(&step), SLOT, CREDS).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Control: a process in the init's own cgroup is not nested.
    let own = bed.container(2, with_role());
    let b = bed.request_translated(Some(&own), SLOT + 1, CREDS).await;
    assert_eq!(b.status, 403, "{}", b.body);
}

#[tokio::test]
async fn a_pending_slot_of_a_host_process_cannot_be_claimed_by_translation() {
    let bed = bed().await;
    // A host process (or a container sharing the host's network
    // namespace) has no address of its own to prove a claim by.
    let agent = bed.process_at("/system.slice/amazon-ssm-agent.service", "ssm-agent");
    let a = bed.request_translated(Some(&agent), SLOT, CREDS).await;
    assert_eq!(a.status, 403);
    assert!(bed.records.pending(SLOT));
    let host_net = bed.container(2, with_role());
    let id = host_net.container.clone().unwrap();
    bed.runtime
        .containers
        .lock()
        .unwrap()
        .get_mut(&id)
        .unwrap()
        .addresses = None;
    let b = bed
        .request_translated(Some(&host_net), SLOT + 1, CREDS)
        .await;
    assert_eq!(b.status, 403, "{}", b.body);
    assert!(bed.records.pending(SLOT + 1));
}

#[tokio::test]
async fn an_inner_docker_in_docker_container_gets_its_outer_containers_role() {
    let bed = bed().await;
    let service = bed.container(1, with_role());
    let inner = bed.inner_container(&service, 7);
    let a = bed.request_translated(Some(&inner), SLOT, CREDS).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "ci-deploy");
    let log = bed.last_log();
    assert_eq!(log.via.as_deref(), Some("translated"));
    assert!(
        log.cgroup
            .as_deref()
            .is_some_and(|c| c.ends_with(&format!("/docker/{}", support::container_id(7)))),
        "the audit line names the inner container's cgroup: {log:?}"
    );
}

#[tokio::test]
async fn a_relay_serving_the_records_namespace_claims_it_from_a_host_address() {
    let bed = bed().await;
    // A rootless container: its network namespace's only way out is a
    // relay on the host, so it has no address of its own Docker knows.
    let job = bed.container(1, with_role());
    let id = job.container.clone().unwrap();
    bed.runtime
        .containers
        .lock()
        .unwrap()
        .get_mut(&id)
        .unwrap()
        .addresses = Some(Vec::new());
    // Control: the same connection, from a host socket no relay of the
    // job's namespace holds, is refused and leaves the record.
    let a = bed.request_via(Some(&job), SLOT, None, CREDS).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(bed.records.pending(SLOT));

    let b = bed
        .request_via(Some(&job), SLOT + 1, Some(777), CREDS)
        .await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.body, "ci-deploy");
    assert!(!bed.records.pending(SLOT + 1), "the record is taken");
    assert_eq!(bed.last_log().via.as_deref(), Some("relayed by pid 777"));
    assert!(
        bed.answers.pinned.lock().unwrap().is_empty(),
        "answers to a relay cross no bridge: nothing to pin"
    );
}

#[tokio::test]
async fn a_relayed_host_process_gets_no_pass_through_to_the_instance() {
    let bed = support::bed_with(&["--allow-host-cgroup", "/system.slice/ssm.service"]).await;
    let agent = bed.process_at("/system.slice/ssm.service", "amazon-ssm-agent");
    // Control: the allow-listed service itself reaches the real IMDS.
    let a = bed
        .request(&agent, "GET", "/latest/meta-data/instance-id", &[])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A process of its cgroup behind a relay of its own (a rootless build
    // step that stayed in the service's cgroup) is not that service.
    let b = bed
        .request_via(
            Some(&agent),
            SLOT,
            Some(777),
            "/latest/meta-data/instance-id",
        )
        .await;
    assert_eq!(b.status, 403, "{}", b.body);
    assert!(bed.records.pending(SLOT));
}
