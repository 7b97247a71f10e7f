//! The IMDS surface, end to end through the HTTP server, in-process: every
//! route, the token rules, each refusal and what the connection log says.

mod support;

use metaproxy::{
    ops::{
        connlog::Outcome,
        metrics::{Lookup, RouteLabel},
    },
    surface::Imdsv1Mode,
};
use support::{bed, bed_with, with_role, Spec};

const ROLE: &str = "ci-deploy";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const TTL: (&str, &str) = ("X-aws-ec2-metadata-token-ttl-seconds", "60");

#[tokio::test]
async fn a_container_walks_the_imdsv2_path_to_its_roles_credentials() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let put = bed.request(&job, "PUT", "/latest/api/token", &[TTL]).await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        put.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("60")
    );
    let token = put.body.clone();
    let auth = [("X-aws-ec2-metadata-token", token.as_str())];

    let listing = bed.request(&job, "GET", CREDS, &auth).await;
    assert_eq!(
        (listing.status, listing.body.as_str()),
        (200, ROLE),
        "no trailing newline"
    );
    let bare = bed
        .request(&job, "GET", CREDS.trim_end_matches('/'), &auth)
        .await;
    assert_eq!(bare.body, ROLE);

    let creds = bed
        .request(&job, "GET", &format!("{CREDS}{ROLE}"), &auth)
        .await;
    assert_eq!(creds.status, 200);
    let doc = creds.json();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    assert!(doc["AccessKeyId"].as_str().unwrap().starts_with("ASIAFAKE"));
    assert!(doc["SecretAccessKey"]
        .as_str()
        .unwrap()
        .starts_with("secret-"));
    assert!(doc["Token"].as_str().unwrap().starts_with("token-"));
    let exp = doc["Expiration"].as_str().unwrap();
    assert!(exp.len() == 20 && exp.ends_with('Z'), "{exp}");
    assert!(doc.get("AccountId").is_none());
    let key = bed.sts.calls.lock().unwrap()[0].clone();
    assert_eq!(
        key.role_arn.as_str(),
        "arn:aws:iam::123456789012:role/ci-deploy"
    );
    assert_eq!(key.session_name, "gitlab-job-1");

    let ext = bed
        .request(
            &job,
            "GET",
            &format!("/latest/meta-data/iam/security-credentials-extended/{ROLE}"),
            &auth,
        )
        .await;
    assert_eq!(ext.json()["AccountId"], "123456789012");

    let info = bed
        .request(&job, "GET", "/latest/meta-data/iam/info", &auth)
        .await
        .json();
    assert_eq!(
        info["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/ci-deploy"
    );
    assert_eq!(bed.sts.calls(), 1, "one AssumeRole, then the cache");

    let served = bed
        .log()
        .into_iter()
        .filter(|c| c.outcome == Outcome::Served)
        .count();
    assert_eq!(served, 6);
    let last = bed.last_log();
    assert_eq!(last.container.as_deref(), Some("job-1"));
    assert_eq!(
        last.role.as_deref(),
        Some("arn:aws:iam::123456789012:role/ci-deploy")
    );
    assert_eq!(last.comm.as_deref(), Some("python3"));
    assert_eq!(last.original_dst.as_deref(), Some("169.254.169.254:80"));
    assert_eq!(
        last.request.as_deref(),
        Some("GET /latest/meta-data/iam/info")
    );
}

#[tokio::test]
async fn token_requests_need_a_ttl_in_range_and_a_put() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    for ttl in [None, Some("0"), Some("21601"), Some("x")] {
        let headers: Vec<(&str, &str)> = ttl
            .map(|t| ("X-aws-ec2-metadata-token-ttl-seconds", t))
            .into_iter()
            .collect();
        let a = bed
            .request(&job, "PUT", "/latest/api/token", &headers)
            .await;
        assert_eq!(a.status, 400, "ttl {ttl:?}");
        assert_eq!(
            bed.last_log().reason.as_deref(),
            Some("token TTL missing or out of range")
        );
    }
    let max = bed
        .request(
            &job,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .await;
    assert_eq!(max.status, 200);
    assert_eq!(
        bed.request(&job, "GET", "/latest/api/token", &[])
            .await
            .status,
        405
    );
    assert_eq!(bed.request(&job, "POST", CREDS, &[]).await.status, 405);
}

#[tokio::test]
async fn tokens_are_bound_to_their_container_and_checked() {
    let bed = bed().await;
    let a = bed.container(1, with_role());
    let b = bed.container(2, with_role());
    let token_a = bed.token(&a).await;
    let stolen = bed
        .request(&b, "GET", CREDS, &[("X-aws-ec2-metadata-token", &token_a)])
        .await;
    assert_eq!(stolen.status, 401);
    let log = bed.last_log();
    assert_eq!(log.outcome, Outcome::Unauthorized);
    assert_eq!(
        log.reason.as_deref(),
        Some("token: minted for another caller, or forged")
    );
    for junk in ["forged", "MP1.1.abc", ""] {
        let r = bed
            .request(&a, "GET", CREDS, &[("X-aws-ec2-metadata-token", junk)])
            .await;
        assert_eq!(r.status, 401, "{junk:?}");
    }
    // IMDSv1 is served unless required.
    assert_eq!(bed.request(&a, "GET", CREDS, &[]).await.status, 200);
}

#[tokio::test]
async fn imdsv1_is_refused_when_imdsv2_is_required() {
    let bed = bed_with(&["--imdsv1", "refuse"]).await;
    let job = bed.container(1, with_role());
    let v1 = bed.request(&job, "GET", CREDS, &[]).await;
    assert_eq!(v1.status, 401);
    assert_eq!(
        bed.last_log().reason.as_deref(),
        Some("IMDSv1 refused (--imdsv1 refuse)")
    );
    let token = bed.token(&job).await;
    let v2 = bed
        .request(&job, "GET", CREDS, &[("X-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!(v2.status, 200);
}

#[tokio::test]
async fn imdsv1_mirrors_the_instance() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    // The fake instance serves IMDSv1: so does metaproxy.
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 200);
    // The admin sets HttpTokens=required; the next check follows it.
    bed.upstream
        .requires_tokens
        .store(true, std::sync::atomic::Ordering::SeqCst);
    bed.imdsv1.check(bed.upstream.as_ref()).await;
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 401);
    assert_eq!(
        bed.last_log().reason.as_deref(),
        Some("IMDSv1 refused (the instance requires IMDSv2)")
    );
    let token = bed.token(&job).await;
    let v2 = bed
        .request(&job, "GET", CREDS, &[("X-aws-ec2-metadata-token", &token)])
        .await;
    assert_eq!(v2.status, 200);
    // Until the instance has answered, IMDSv1 is refused.
    let fresh = metaproxy::surface::Imdsv1Gate::new(Imdsv1Mode::Mirror);
    assert_eq!(fresh.refusal(), Some("the instance requires IMDSv2"));
}

#[tokio::test]
async fn forwarded_requests_are_refused_like_imds_does() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let a = bed
        .request(
            &job,
            "PUT",
            "/latest/api/token",
            &[TTL, ("X-Forwarded-For", "10.0.0.1")],
        )
        .await;
    assert_eq!(a.status, 403);
    assert_eq!(
        bed.last_log().reason.as_deref(),
        Some("X-Forwarded-For present")
    );
}

#[tokio::test]
async fn secret_and_unknown_paths_are_404_and_never_forwarded() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    for path in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/signature",
        "/latest/meta-data/../user-data",
        "/latest/meta-data/placement/region?x=1",
        &format!("{CREDS}other-role"),
        &format!("{CREDS}{ROLE}/x"),
        "/",
    ] {
        let a = bed.request(&job, "GET", path, &[]).await;
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(bed.last_log().outcome, Outcome::NotFound, "{path}");
    }
    assert!(bed.upstream.forwards.lock().unwrap().is_empty());
    assert!(bed.upstream.gets.lock().unwrap().is_empty());
    // The allow-listed, non-secret metadata comes from the real IMDS.
    let region = bed
        .request(&job, "GET", "/latest/meta-data/placement/region", &[])
        .await;
    assert_eq!((region.status, region.body.as_str()), (200, "eu-west-1"));
    let missing = bed
        .request(&job, "GET", "/latest/meta-data/ami-id", &[])
        .await;
    assert_eq!(missing.status, 502);
}

#[tokio::test]
async fn a_container_without_a_role_or_with_a_refused_one_gets_404() {
    let bed = bed().await;
    let none = bed.container(1, Spec::default());
    let a = bed.request(&none, "GET", CREDS, &[]).await;
    assert_eq!(a.status, 404);
    let log = bed.last_log();
    assert_eq!((log.outcome, log.reason), (Outcome::NoRole, None));
    assert_eq!(log.role, None);

    let from_image = bed.container(
        2,
        Spec {
            env: &["IAM_ROLE=admin"],
            image_env: &["IAM_ROLE=admin"],
            ..Default::default()
        },
    );
    assert_eq!(
        bed.request(&from_image, "GET", CREDS, &[]).await.status,
        404
    );
    let log = bed.last_log();
    assert_eq!(log.outcome, Outcome::Refused);
    assert_eq!(
        log.reason.as_deref(),
        Some("IAM_ROLE comes from the image's ENV; only the runner may set it")
    );

    let twice = bed.container(
        3,
        Spec {
            env: &["IAM_ROLE=ci-deploy", "IAM_ROLE=admin"],
            ..Default::default()
        },
    );
    assert_eq!(
        bed.request(&twice, "GET", &format!("{CREDS}admin"), &[])
            .await
            .status,
        404
    );
    assert!(bed.last_log().reason.unwrap().contains("more than once"));

    let other_account = bed.container(
        4,
        Spec {
            env: &["IAM_ROLE=arn:aws:iam::999999999999:role/x"],
            ..Default::default()
        },
    );
    assert_eq!(
        bed.request(&other_account, "GET", CREDS, &[]).await.status,
        404
    );
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .contains("arn:aws:iam::999999999999:role/x is not allowed by --allow-role"));
    assert_eq!(bed.sts.calls(), 0);
}

#[tokio::test]
async fn the_allow_list_decides_which_roles_exist() {
    let bed = bed_with(&["--allow-role", "arn:aws:iam::*:role/ci-*"]).await;
    let ok = bed.container(1, with_role());
    assert_eq!(
        bed.request(&ok, "GET", &format!("{CREDS}{ROLE}"), &[])
            .await
            .status,
        200
    );
    let admin = bed.container(
        2,
        Spec {
            env: &["IAM_ROLE=admin"],
            ..Default::default()
        },
    );
    assert_eq!(bed.request(&admin, "GET", CREDS, &[]).await.status, 404);
    assert!(bed.last_log().reason.unwrap().contains("--allow-role"));
}

#[tokio::test]
async fn unrecorded_connections_are_refused_and_closed() {
    let bed = bed().await;
    let a = bed
        .send_raw(None, b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(a.status, 403);
    assert_eq!(a.header("connection"), Some("close"));
    let log = bed.last_log();
    assert_eq!(log.outcome, Outcome::Refused);
    assert_eq!(
        log.reason.as_deref(),
        Some("no probe record for this connection")
    );
    assert_eq!(log.cgroup_id, None);
}

#[tokio::test]
async fn containers_the_runtime_does_not_know_are_refused() {
    let bed = bed().await;
    let ghost = bed.process_at(&format!("/docker/{}", support::container_id(77)), "sh");
    let a = bed.request(&ghost, "GET", CREDS, &[]).await;
    assert_eq!(a.status, 403);
    assert!(bed
        .last_log()
        .reason
        .unwrap()
        .contains("which the Docker daemon does not know"));
    assert!(bed.upstream.forwards.lock().unwrap().is_empty());
    let podman = bed.process_at(
        &format!("/machine.slice/libpod-{}.scope", support::container_id(78)),
        "sh",
    );
    assert_eq!(bed.request(&podman, "GET", CREDS, &[]).await.status, 403);
}

#[tokio::test]
async fn a_connection_from_another_address_is_not_the_containers() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let id = job.container.clone().unwrap();
    bed.runtime
        .containers
        .lock()
        .unwrap()
        .get_mut(&id)
        .unwrap()
        .addresses = Some(vec!["172.17.0.9".parse().unwrap()]);
    let a = bed.request(&job, "GET", CREDS, &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        bed.last_log().reason.as_deref(),
        Some("client address 127.0.0.1 is not the container's")
    );
}

#[tokio::test]
async fn host_processes_pass_through_only_from_allow_listed_cgroups() {
    let bed = bed_with(&[
        "--allow-host-cgroup",
        "/system.slice/amazon-ssm-agent.service",
    ])
    .await;
    let agent = bed.process_at("/system.slice/amazon-ssm-agent.service", "ssm-agent");
    let a = bed
        .request(
            &agent,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .await;
    assert_eq!((a.status, a.body.as_str()), (200, "instance-answer"));
    assert_eq!(bed.last_log().outcome, Outcome::Passthrough);
    let forwards = bed.upstream.forwards.lock().unwrap().clone();
    let (method, path, headers, _) = &forwards[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PUT", "/latest/api/token")
    );
    assert!(headers
        .iter()
        .any(|(k, v)| k == "x-aws-ec2-metadata-token-ttl-seconds" && v == "21600"));

    // In no container is not a reason to trust: a BuildKit RUN step, the
    // root cgroup, a login session, dockerd itself.
    for (path, comm, reason) in [
        (
            "/docker/buildkit/lq1hn4a0qq7ek6tq8tqmb9p8u",
            "wget",
            "BuildKit build step in /docker/buildkit/lq1hn4a0qq7ek6tq8tqmb9p8u: no pass-through",
        ),
        ("/", "curl", "cgroup / is not in --allow-host-cgroup"),
        (
            "/user.slice/user-1000.slice/session-3.scope",
            "curl",
            "cgroup /user.slice/user-1000.slice/session-3.scope is not in --allow-host-cgroup",
        ),
        (
            "/system.slice/docker.service",
            "dockerd",
            "dockerd acts for containers; it gets no pass-through",
        ),
    ] {
        let who = bed.process_at(path, comm);
        let token = bed
            .request(
                &who,
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
            )
            .await;
        assert_eq!(token.status, 403, "{path}");
        assert_eq!(bed.last_log().reason.as_deref(), Some(reason));
    }
    assert_eq!(bed.upstream.forwards.lock().unwrap().len(), 1);

    // Without an allow-list, no host process passes.
    let deny = support::bed().await;
    let agent = deny.process_at("/system.slice/amazon-ssm-agent.service", "ssm-agent");
    assert_eq!(deny.request(&agent, "GET", CREDS, &[]).await.status, 403);
    assert!(deny.upstream.forwards.lock().unwrap().is_empty());
}

#[tokio::test]
async fn malformed_http_gets_an_error_and_the_server_keeps_serving() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let junk = bed.send_raw(Some(&job), b"\x00\x01 garbage\r\n\r\n").await;
    assert_eq!(junk.status, 400, "{junk:?}");
    let huge = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let big = bed.send_raw(Some(&job), huge.as_bytes()).await;
    assert!(
        big.status == 431 || big.status == 414 || big.status == 400 || big.status == 0,
        "{big:?}"
    );
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 200);
}

#[tokio::test]
async fn keep_alive_connections_are_served_request_after_request() {
    use tokio::io::AsyncWriteExt as _;
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let get = format!("GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n");
    let mut conn = bed.connect(&job).await;
    for round in 0..3 {
        conn.write_all(get.as_bytes()).await.unwrap();
        let a = support::read_response(&mut conn).await.expect("an answer");
        assert_eq!((a.status, a.body.as_str()), (200, ROLE), "round {round}");
        // Long enough for the server to go back to waiting in between.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Two requests in one write: both answered, in order.
    let token = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n{}: {}\r\n\r\n",
        TTL.0, TTL.1
    );
    conn.write_all(format!("{token}{get}").as_bytes())
        .await
        .unwrap();
    let first = support::read_response(&mut conn).await.expect("the token");
    assert_eq!(first.status, 200);
    assert!(first.body.starts_with("MP1."), "{first:?}");
    let second = support::read_response(&mut conn).await.expect("the roles");
    assert_eq!(second.body, ROLE);
    // Headers that arrive in pieces are waited for, not cut short.
    let (head, tail) = get.split_at(20);
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    conn.write_all(tail.as_bytes()).await.unwrap();
    let a = support::read_response(&mut conn).await.expect("an answer");
    assert_eq!(a.body, ROLE);
    // `Connection: close` is answered, then the server closes.
    conn.write_all(
        format!("GET {CREDS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(support::read_response(&mut conn).await.unwrap().body, ROLE);
    assert!(support::read_response(&mut conn).await.is_none(), "closed");
    let served: Vec<_> = bed
        .log()
        .into_iter()
        .filter(|c| c.outcome == Outcome::Served)
        .collect();
    assert_eq!(served.len(), 7, "{served:?}");
    assert!(served.iter().all(|c| c.client == served[0].client));
}

#[tokio::test]
async fn a_cgroup_named_after_a_container_is_not_that_container() {
    let bed = bed().await;
    let victim = bed.container(1, with_role());
    let victim_id = victim.container.clone().unwrap();
    // Whoever can create cgroups can name one after the victim.
    let forged = bed.process_at(&format!("/evil/docker-{victim_id}.scope"), "sh");
    let a = bed
        .request(&forged, "GET", &format!("{CREDS}{ROLE}"), &[])
        .await;
    assert_eq!(a.status, 403);
    assert_eq!(
        bed.last_log().reason,
        Some(format!(
            "cgroup /evil/docker-{victim_id}.scope is named after container {victim_id}, which does not run there"
        ))
    );
    // An unknown outermost id is refused, never skipped for an inner one.
    let wrapped = bed.process_at(
        &format!("/docker/{}/docker/{victim_id}", support::container_id(99)),
        "sh",
    );
    assert_eq!(bed.request(&wrapped, "GET", CREDS, &[]).await.status, 403);
    assert!(bed.last_log().reason.unwrap().contains("does not know"));
    // Docker-in-Docker: a child cgroup of the victim is the victim's.
    let inner = bed.process_at(
        &format!("/docker/{victim_id}/docker/{}", support::container_id(98)),
        "sh",
    );
    assert_eq!(bed.request(&inner, "GET", CREDS, &[]).await.body, ROLE);
    assert_eq!(bed.sts.calls(), 0);
}

#[tokio::test]
async fn one_container_cannot_hold_more_than_its_share_of_connections() {
    use tokio::io::AsyncReadExt as _;
    let bed = bed_with(&[
        "--max-connections",
        "64",
        "--max-connections-per-container",
        "2",
    ])
    .await;
    let greedy = bed.container(1, with_role());
    let other = bed.container(2, with_role());
    let held = [bed.connect(&greedy).await, bed.connect(&greedy).await];
    support::until("both held connections taken in", || {
        bed.count.largest_per_cgroup() == 2
    })
    .await;
    // The third is closed at once, without an answer.
    let mut third = bed.connect(&greedy).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(bed.metrics.shed.get(), 1);
    // Another container is served meanwhile.
    assert_eq!(bed.request(&other, "GET", CREDS, &[]).await.status, 200);
    // Once the held connections go, the container is served again.
    drop(held);
    support::until("the held connections closed", || bed.count.open() == 0).await;
    assert_eq!(bed.request(&greedy, "GET", CREDS, &[]).await.status, 200);
}

#[tokio::test]
async fn the_global_cap_closes_the_excess_and_long_paths_are_cut_in_the_log() {
    use tokio::io::AsyncReadExt as _;
    let bed = bed_with(&[
        "--max-connections",
        "3",
        "--max-connections-per-container",
        "3",
    ])
    .await;
    let jobs: Vec<_> = (1..=4).map(|n| bed.container(n, with_role())).collect();
    let mut held = Vec::new();
    for job in &jobs[..3] {
        held.push(bed.connect(job).await);
    }
    support::until("three connections taken in", || bed.count.open() == 3).await;
    let mut fourth = bed.connect(&jobs[3]).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), fourth.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(held);
    support::until("the held connections closed", || bed.count.open() == 0).await;
    let long = format!("/latest/meta-data/{}", "a".repeat(5000));
    assert_eq!(bed.request(&jobs[3], "GET", &long, &[]).await.status, 404);
    let logged = bed.last_log().request.unwrap();
    assert!(logged.len() < 250 && logged.ends_with("..."), "{logged}");
}

#[tokio::test]
async fn a_refused_role_costs_one_docker_call_however_often_it_is_asked() {
    let bed = bed().await;
    let refused = bed.container(
        1,
        Spec {
            env: &["IAM_ROLE=arn:aws:iam::999999999999:role/elsewhere"],
            ..Default::default()
        },
    );
    for _ in 0..20 {
        assert_eq!(bed.request(&refused, "GET", CREDS, &[]).await.status, 404);
    }
    assert_eq!(
        bed.runtime
            .inspects
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the container is inspected once, then remembered"
    );
    assert_eq!(bed.sts.calls(), 0);
}

#[tokio::test]
async fn unrecorded_connections_cannot_crowd_out_containers() {
    use tokio::io::AsyncReadExt as _;
    let bed = bed_with(&[
        "--max-connections",
        "100",
        "--max-connections-per-container",
        "10",
    ])
    .await;
    let job = bed.container(1, with_role());
    // Direct connects to the listen address hold at most a small pool.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(bed.connect_unrecorded().await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut extra = bed.connect_unrecorded().await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A container is still served.
    assert_eq!(bed.request(&job, "GET", CREDS, &[]).await.status, 200);
    drop(held);
}

#[tokio::test]
async fn metrics_count_each_request_by_route_outcome_and_reason() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let bare = bed.container(2, Spec::default());
    let token = |who| {
        let bed = &bed;
        async move {
            bed.request(who, "PUT", "/latest/api/token", &[TTL])
                .await
                .body
        }
    };
    let (id_token, bare_token) = (token(&job).await, token(&bare).await);
    let auth = |t: &str| [("X-aws-ec2-metadata-token", t.to_string())];
    let get = |who, path: &str, t: &str| {
        let bed = &bed;
        let (path, h) = (path.to_string(), auth(t));
        async move {
            let h = [(h[0].0, h[0].1.as_str())];
            bed.request(who, "GET", &path, &h).await.status
        }
    };
    let creds = format!("{CREDS}{ROLE}");
    assert_eq!(get(&job, &creds, &id_token).await, 200);
    assert_eq!(get(&job, &creds, &id_token).await, 200);
    assert_eq!(get(&bare, CREDS, &bare_token).await, 404);
    assert_eq!(get(&job, "/latest/user-data", &id_token).await, 404);
    assert_eq!(get(&job, &creds, &bare_token).await, 401);

    let m = &bed.metrics;
    assert_eq!(m.requests_of(RouteLabel::Token, Outcome::Served), 2);
    assert_eq!(m.requests_of(RouteLabel::Credentials, Outcome::Served), 2);
    assert_eq!(m.requests_of(RouteLabel::RoleListing, Outcome::NoRole), 1);
    assert_eq!(m.requests_of(RouteLabel::Other, Outcome::NotFound), 1);
    assert_eq!(
        m.requests_of(RouteLabel::Credentials, Outcome::Unauthorized),
        1
    );
    assert_eq!(m.refusals_of("no-role"), 1);
    assert_eq!(m.refusals_of("not-found"), 1);
    assert_eq!(m.refusals_of("bad-token"), 1);
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("served", "", m.served_remaining.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("served_count 2"),
        "two answers carried credentials: {text}"
    );
    let cache = bed.credentials.metrics();
    assert_eq!(
        (
            cache.lookups_of(Lookup::Miss),
            cache.lookups_of(Lookup::Hit)
        ),
        (1, 1)
    );
    assert_eq!(bed.sts_metrics.calls_of("AssumeRole"), 1);
    // Each container was inspected once, then served from the cache.
    assert_eq!(bed.identities.metrics().calls_of("inspect"), 2);
}

/// The answer pin: a container's connection is pinned to it before its
/// first request is read, and where that cannot be done the daemon says
/// nothing at all (an answer could go wherever forged frames send it).
#[tokio::test]
async fn answers_go_only_where_they_are_pinned() {
    let bed = bed().await;
    let job = bed.container(1, with_role());
    let put = bed.request(&job, "PUT", "/latest/api/token", &[TTL]).await;
    assert_eq!(put.status, 200, "{put:?}");
    let pinned = bed.answers.pinned.lock().unwrap().clone();
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    assert_eq!(
        pinned[0].0,
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    // A host process crosses no bridge: nothing to pin for it.
    let host = bed.process_at("/system.slice/ssm.service", "ssm-agent");
    let _ = bed
        .request(&host, "GET", "/latest/meta-data/instance-id", &[])
        .await;
    assert_eq!(bed.answers.pinned.lock().unwrap().len(), 1);

    *bed.answers.refuse.lock().unwrap() = Some("no port on docker0".into());
    let other = bed.container(2, with_role());
    let refused = bed
        .request(&other, "PUT", "/latest/api/token", &[TTL])
        .await;
    assert_eq!(refused.status, 0, "closed unanswered: {refused:?}");
    assert_eq!(bed.metrics.unpinned.get(), 1);
    assert_eq!(
        bed.sts.calls.lock().unwrap().len(),
        0,
        "nothing was fetched"
    );
}
