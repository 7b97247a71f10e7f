//! The credential cache through the pipeline, in-process: single flight,
//! prefetch on container start, refresh ahead, last good kept while STS
//! fails, failures shared and remembered, eviction with the container.

mod support;

use std::time::{Duration, Instant};

use metaproxy::model::gitlab::JOB_LABEL;

use metaproxy::{
    credentials::CredKey,
    identity::RuntimeEvent,
    model::ids::RoleArn,
    ops::{connlog::Outcome, metrics::RouteLabel},
};
use support::{bed, Spec, StsMode};

const ROLE: &str = "ci-deploy";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/ci-deploy";

fn spec() -> Spec<'static> {
    Spec {
        env: &["IAM_ROLE=ci-deploy"],
        labels: &[(JOB_LABEL, "777")],
        ..Default::default()
    }
}

fn key() -> CredKey {
    CredKey {
        role_arn: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{ROLE}")).unwrap(),
        external_id: None,
        session_name: "gitlab-job-777".into(),
        session: Default::default(),
        id_token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_make_one_assume_role() {
    let bed = bed().await;
    let job = bed.container(1, spec());
    bed.sts.set(StsMode::Hold);
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (bed, job) = (&bed, &job);
            async move { bed.request(job, "GET", CREDS, &[]).await }
        })
        .collect();
    let release = async {
        support::until("the first AssumeRole", || bed.sts.calls() >= 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        bed.sts.release.notify_waiters();
    };
    let (answers, ()) = tokio::join!(futures_util::future::join_all(requests), release);
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    let keys: std::collections::HashSet<_> = answers
        .iter()
        .map(|a| a.json()["AccessKeyId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(bed.sts.calls(), 1);
    assert_eq!(bed.sts.calls.lock().unwrap()[0], key());
}

#[tokio::test]
async fn a_slow_sts_answers_503_in_time_and_the_fetch_fills_the_cache() {
    let bed = bed().await;
    let job = bed.container(1, spec());
    bed.sts.set(StsMode::Hold);
    let started = Instant::now();
    let slow = bed.request(&job, "GET", CREDS, &[]).await;
    assert_eq!(slow.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        bed.last_log().reason.as_deref(),
        Some("STS has not answered within 800ms; still trying")
    );
    bed.sts.release.notify_waiters();
    support::until("the background fetch", || !bed.credentials.is_empty()).await;
    let again = bed.request(&job, "GET", CREDS, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        bed.sts.calls(),
        1,
        "the retry used what the first fetch got"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sts_is_asked_once_for_many_waiters_and_not_again_at_once() {
    let bed = bed().await;
    let job = bed.container(1, spec());
    bed.sts.set(StsMode::Fail);
    let answers =
        futures_util::future::join_all((0..20).map(|_| bed.request(&job, "GET", CREDS, &[]))).await;
    assert!(answers.iter().all(|a| a.status == 503), "{answers:?}");
    assert!(bed.last_log().reason.unwrap().contains("AccessDenied"));
    assert_eq!(bed.sts.calls(), 1, "one failure, shared");
    // Remembered for a moment: a retry right away costs no STS call ...
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 503);
    assert_eq!(bed.sts.calls(), 1);
    // ... nor any retry while the failure is remembered; once the backoff
    // is over, STS is asked again.
    bed.sts.set(StsMode::Ok(Duration::from_secs(3600)));
    let started = Instant::now();
    let mut retries = 0;
    loop {
        let status = bed.request(&job, "GET", CREDS, &[]).await.status;
        if status == 200 {
            break;
        }
        assert_eq!((status, bed.sts.calls()), (503, 1), "within the backoff");
        assert!(started.elapsed() < Duration::from_secs(5), "backoff over");
        retries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "backed off"
    );
    assert_eq!(bed.sts.calls(), 2);
    // The metrics say the same.
    let sts = &bed.sts_metrics;
    assert_eq!(sts.calls_of("AssumeRole"), 2);
    assert_eq!(sts.errors_of("AssumeRole", "AccessDenied"), 1);
    assert_eq!(sts.in_flight.get(), 0);
    assert_eq!(bed.metrics.refusals_of("sts-unavailable"), 21 + retries);
    assert_eq!(
        bed.metrics
            .requests_of(RouteLabel::Credentials, Outcome::Served),
        1
    );
}

#[tokio::test]
async fn credentials_are_prefetched_on_start_and_dropped_when_the_container_goes() {
    let bed = bed().await;
    let job = bed.container(1, spec());
    let id = job.container.clone().unwrap();
    bed.runtime
        .events_tx
        .send(RuntimeEvent::Start(id.clone()))
        .unwrap();
    support::until("the prefetch", || !bed.credentials.is_empty()).await;
    assert_eq!(bed.sts.calls(), 1);
    // Served from the cache, even with STS down now.
    bed.sts.set(StsMode::Fail);
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 200);
    assert_eq!(bed.sts.calls(), 1);

    bed.runtime.events_tx.send(RuntimeEvent::Stop(id)).unwrap();
    support::until("the eviction", || bed.credentials.is_empty()).await;
}

#[tokio::test]
async fn a_key_shared_by_two_containers_stays_until_both_are_gone() {
    let bed = bed().await;
    // A job's build and service containers share the job's session.
    let build = bed.container(1, spec());
    let service = bed.container(2, spec());
    assert_eq!(bed.request(&build, "GET", CREDS, &[]).await.status, 200);
    assert_eq!(bed.request(&service, "GET", CREDS, &[]).await.status, 200);
    assert_eq!((bed.sts.calls(), bed.credentials.len()), (1, 1));
    bed.runtime
        .events_tx
        .send(RuntimeEvent::Stop(build.container.unwrap()))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.credentials.len(), 1);
    bed.runtime
        .events_tx
        .send(RuntimeEvent::Stop(service.container.unwrap()))
        .unwrap();
    support::until("the eviction", || bed.credentials.is_empty()).await;
}

#[tokio::test]
async fn refresh_ahead_renews_and_the_last_good_survives_an_outage() {
    let bed = bed().await;
    let job = bed.container(1, spec());
    // 25 minutes left: servable (20 min floor), but due for refresh (30).
    bed.sts.set(StsMode::Ok(Duration::from_secs(25 * 60)));
    let first = bed.request(&job, "GET", CREDS, &[]).await.json();
    bed.sts.set(StsMode::Ok(Duration::from_secs(3600)));
    bed.credentials.refresh_due().await;
    assert_eq!(bed.sts.calls(), 2);
    let renewed = bed.request(&job, "GET", CREDS, &[]).await.json();
    assert_ne!(first["AccessKeyId"], renewed["AccessKeyId"]);
    // A refresh with nothing due asks nothing.
    bed.credentials.refresh_due().await;
    assert_eq!(bed.sts.calls(), 2);

    // STS failing: still-valid credentials are served, not an error.
    let other = bed.container(
        2,
        Spec {
            env: &["IAM_ROLE=ci-deploy"],
            labels: &[(JOB_LABEL, "778")],
            ..Default::default()
        },
    );
    bed.sts.set(StsMode::Ok(Duration::from_secs(10 * 60)));
    bed.credentials.refresh_due().await; // nothing for job 778 yet
    let short = bed.request(&other, "GET", CREDS, &[]).await;
    assert_eq!(short.status, 200, "{short:?}");
    bed.sts.set(StsMode::Fail);
    let kept = bed.request(&other, "GET", CREDS, &[]).await;
    assert_eq!(kept.status, 200, "last good kept while STS fails: {kept:?}");
    assert_eq!(kept.json()["AccessKeyId"], short.json()["AccessKeyId"]);
}

#[tokio::test]
async fn session_tags_and_source_identity_come_from_the_runners_labels_and_variables() {
    let bed = support::bed_with(&[
        "--session-tags",
        "--session-tag-name",
        "ref=Branch",
        "--transitive-session-tags",
        "--source-identity",
    ])
    .await;
    let spec = |project: &'static str| Spec {
        env: if project == "42" {
            &[
                "IAM_ROLE=ci-deploy",
                "CI_PROJECT_ID=42",
                "CI_PROJECT_PATH=group/app",
            ]
        } else {
            &[
                "IAM_ROLE=ci-deploy",
                "CI_PROJECT_ID=43",
                "CI_PROJECT_PATH=group/app",
            ]
        },
        labels: if project == "42" {
            &[
                ("com.gitlab.gitlab-runner.project.id", "42"),
                ("com.gitlab.gitlab-runner.job.ref", "main"),
            ]
        } else {
            &[
                ("com.gitlab.gitlab-runner.project.id", "43"),
                ("com.gitlab.gitlab-runner.job.ref", "main"),
            ]
        },
        ..Default::default()
    };
    let a = bed.container(1, spec("42"));
    let b = bed.container(2, spec("43"));
    assert_eq!(bed.request(&a, "GET", CREDS, &[]).await.status, 200);
    assert_eq!(bed.request(&b, "GET", CREDS, &[]).await.status, 200);
    let calls = bed.sts.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "tagged sessions are never shared");
    let tags: std::collections::HashMap<_, _> = calls[0].session.tags.iter().cloned().collect();
    assert_eq!(tags["gitlab-project-id"], "42");
    assert_eq!(
        tags["gitlab-project-path"], "group/app",
        "the path of the runner's project, whose CI_PROJECT_ID matches its label"
    );
    assert_eq!(tags["Branch"], "main");
    assert_eq!(tags["gitlab-job-id"], "1");
    assert!(calls[0].session.transitive);
    assert_eq!(
        calls[0].session.source_identity.as_deref(),
        Some("gitlab-job-1")
    );

    // A trust policy without sts:TagSession: the refusal says so.
    let c = bed.container(3, spec("42"));
    bed.sts.set(StsMode::Fail);
    assert_eq!(bed.request(&c, "GET", CREDS, &[]).await.status, 503);
    let reason = bed.last_log().reason.unwrap();
    assert!(reason.contains("sts:TagSession"), "{reason}");
    assert!(reason.contains("sts:SetSourceIdentity"), "{reason}");
}
