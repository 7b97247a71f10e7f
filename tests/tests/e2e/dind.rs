//! Docker-in-Docker: a job's inner containers, behind the service
//! container's NAT, get the job's role, and only the job's.

use metaproxy_tests::{
    bed::{job_label, E2eBed, ROLE_BUILD, ROLE_DEPLOY},
    dind::Dind,
};

use crate::{assert_real_imds_untouched, is_assumed};

#[test]
fn an_inner_container_gets_its_jobs_role_and_one_of_a_job_without_gets_nothing() {
    let bed = E2eBed::start(&[]).expect("bed");
    let label = job_label(5151);
    let dind = Dind::start(
        &bed,
        "dind-with-role",
        &[("IAM_ROLE", ROLE_DEPLOY)],
        &["--label", &label],
    )
    .expect("dind");
    let inner = dind.sdk_client("inner-with-role").expect("inner client");
    assert_real_imds_untouched(&bed);
    assert_eq!(inner["ok"], true, "{inner}\n{}", bed.daemon.log());
    let arn = inner["arns"][0].as_str().unwrap();
    assert!(is_assumed(ROLE_DEPLOY, "gitlab-job-5151", arn), "{inner}");

    // The audit line names the service container (the job's) and the
    // inner container's cgroup, below it.
    let conns = bed.daemon.connections().unwrap();
    let served = conns
        .iter()
        .find(|c| c["container"] == "dind-with-role" && c["outcome"] == "served")
        .unwrap_or_else(|| panic!("{conns:#?}"));
    let cgroup = served["cgroup"].as_str().unwrap();
    assert!(cgroup.contains("/dind/"), "{cgroup}");
    // Behind the service's NAT: found by its slot, not its 4-tuple (the
    // old design refused exactly these).
    assert_eq!(served["via"], "translated", "{served}");
    // Each inner container gets an audit line of its own, naming its
    // cgroup, though the credentials are the service container's.
    let again = dind.sdk_client("inner-with-role-2").expect("inner client");
    assert_eq!(again["ok"], true, "{again}");
    let log = bed.daemon.log();
    let issued: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("credentials issued") && l.contains("container=dind-with-role"))
        .collect();
    assert_eq!(issued.len(), 2, "{log}");
    assert!(issued[0].contains(&format!("nested=\"{cgroup}\"")), "{log}");
    assert!(issued.iter().all(|l| l.contains("/dind/")), "{log}");

    let none = Dind::start(&bed, "dind-no-role", &[], &[]).expect("dind");
    let nothing = none.sdk_client("inner-no-role").expect("inner client");
    assert_eq!(nothing["ok"], false, "{nothing}");
    assert!(nothing["arns"].as_array().unwrap().is_empty(), "{nothing}");
    assert_real_imds_untouched(&bed);
}

#[test]
fn two_jobs_inner_containers_at_once_each_get_their_own_role() {
    let bed = E2eBed::start(&[]).expect("bed");
    let a = Dind::start(&bed, "dind-a", &[("IAM_ROLE", ROLE_DEPLOY)], &[]).expect("dind a");
    let b = Dind::start(&bed, "dind-b", &[("IAM_ROLE", ROLE_BUILD)], &[]).expect("dind b");
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.sdk_client("inner-a"));
        let tb = s.spawn(|| b.sdk_client("inner-b"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (ra, rb) = (ra.expect("inner a"), rb.expect("inner b"));
    assert_eq!(ra["ok"], true, "{ra}");
    assert_eq!(rb["ok"], true, "{rb}");
    assert!(
        ra["arns"][0]
            .as_str()
            .unwrap()
            .contains(&format!("/{ROLE_DEPLOY}/")),
        "{ra}"
    );
    assert!(
        rb["arns"][0]
            .as_str()
            .unwrap()
            .contains(&format!("/{ROLE_BUILD}/")),
        "{rb}"
    );
    assert_real_imds_untouched(&bed);
}
