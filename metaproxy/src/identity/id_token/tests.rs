//! The verifier over fixture keys (`testdata/`: RSA keys made for these
//! tests only; `a` and `b` are the issuer's, `rogue` is not).

use std::{collections::HashMap, sync::atomic::AtomicUsize};

use futures_util::FutureExt as _;
use jsonwebtoken::{EncodingKey, Header};

use super::*;
use crate::model::ids::ContainerId;

const ISSUER: &str = "https://gitlab.example.com";
const AUD: &str = "sts.amazonaws.com";

fn pem(name: &str) -> &'static [u8] {
    match name {
        "a" => include_bytes!("testdata/a.pem"),
        "b" => include_bytes!("testdata/b.pem"),
        _ => include_bytes!("testdata/rogue.pem"),
    }
}

fn jwks(name: &str) -> JwkSet {
    serde_json::from_str(match name {
        "a" => include_str!("testdata/jwks-a.json"),
        "b" => include_str!("testdata/jwks-b.json"),
        _ => include_str!("testdata/jwks-ab.json"),
    })
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(job: &str) -> serde_json::Value {
    let now = now();
    serde_json::json!({
        "iss": ISSUER, "aud": AUD,
        "sub": "project_path:group/app:ref_type:branch:ref:main",
        "iat": now, "nbf": now - 5, "exp": now + 3600,
        "job_id": job, "project_id": "20", "project_path": "group/app",
        "namespace_path": "group", "pipeline_id": "574",
        "ref": "main", "ref_type": "branch", "ref_protected": "true",
        "runner_id": 1,
    })
}

/// A token signed with fixture key `key`, published (or not) as `kid`.
fn sign(key: &str, kid: &str, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(pem(key)).unwrap(),
    )
    .unwrap()
}

fn with(mut c: serde_json::Value, k: &str, v: serde_json::Value) -> serde_json::Value {
    c[k] = v;
    c
}

/// The issuer's keys from a table that can change, or fail, and counts
/// fetches.
struct Table {
    set: Mutex<Result<JwkSet, String>>,
    fetches: AtomicUsize,
}

impl KeySource for Table {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let set = self.set.lock().unwrap().clone();
        async move { set }.boxed()
    }
}

fn verifier(keys: &str) -> (Arc<IdTokens>, Arc<Table>) {
    let table = Arc::new(Table {
        set: Mutex::new(Ok(jwks(keys))),
        fetches: AtomicUsize::new(0),
    });
    let rules = TokenRules {
        issuer: ISSUER.into(),
        audience: AUD.into(),
        variable: "AWS_ID_TOKEN",
    };
    (Arc::new(IdTokens::new(rules, table.clone())), table)
}

fn job_container(job: &str, env: &[String], image_env: &[String]) -> Container {
    Container {
        id: ContainerId::parse(&"b".repeat(64)).unwrap(),
        name: "job".into(),
        labels: HashMap::from([(gitlab::JOB_LABEL.to_string(), job.to_string())]),
        env: env.to_vec(),
        image_env: image_env.to_vec(),
        image_labels: HashMap::new(),
        addresses: None,
        cgroup: None,
        wire: Default::default(),
    }
}

fn refusal(state: TokenState) -> TokenRefusal {
    match state {
        TokenState::Refused(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_token_of_the_containers_own_job_verifies() {
    let (v, _) = verifier("a");
    let token = sign("a", "key-a", &claims("302"));
    let c = job_container("302", &[format!("AWS_ID_TOKEN={token}")], &[]);
    let TokenState::Verified(t) = v.check(&c).await else {
        panic!("not verified");
    };
    assert_eq!(t.claims.project_path, "group/app");
    assert!(t.claims.ref_protected);
    assert_eq!(t.raw.expose(), token);
    // No token at all is no token, not a refusal.
    let c = job_container("302", &[], &[]);
    assert_eq!(v.check(&c).await, TokenState::Absent);
}

/// What a refusal must be.
type Expect = fn(&TokenRefusal) -> bool;

#[tokio::test]
async fn each_failed_check_is_a_refusal_that_says_which() {
    let (v, _) = verifier("a");
    let c = claims("302");
    let past = now() - 7200;
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "expired",
            sign(
                "a",
                "key-a",
                &with(
                    with(c.clone(), "exp", past.into()),
                    "iat",
                    (past - 60).into(),
                ),
            ),
            |r| matches!(r, TokenRefusal::Expired { .. }),
        ),
        (
            "wrong aud",
            sign(
                "a",
                "key-a",
                &with(c.clone(), "aud", "https://vault.example.com".into()),
            ),
            |r| matches!(r, TokenRefusal::Audience { .. }),
        ),
        (
            "another issuer",
            sign(
                "a",
                "key-a",
                &with(c.clone(), "iss", "https://gitlab.evil.example".into()),
            ),
            |r| matches!(r, TokenRefusal::Issuer { found, .. } if found == "https://gitlab.evil.example"),
        ),
        (
            "signed by a key not in the JWKS",
            sign("rogue", "key-rogue", &c),
            |r| matches!(r, TokenRefusal::UnknownKey { kid } if kid == "key-rogue"),
        ),
        (
            "a rogue key under the issuer's kid",
            sign("rogue", "key-a", &c),
            |r| matches!(r, TokenRefusal::Signature { .. }),
        ),
        (
            "not yet valid",
            sign("a", "key-a", &with(c.clone(), "nbf", (now() + 600).into())),
            |r| matches!(r, TokenRefusal::NotYetValid { .. }),
        ),
        (
            "issued in the future",
            sign("a", "key-a", &with(c.clone(), "iat", (now() + 600).into())),
            |r| matches!(r, TokenRefusal::IssuedInFuture { .. }),
        ),
        (
            "no job_id",
            sign("a", "key-a", &{
                let mut c = c.clone();
                c.as_object_mut().unwrap().remove("job_id");
                c
            }),
            |r| matches!(r, TokenRefusal::Claims(_)),
        ),
        (
            "another job's token",
            sign("a", "key-a", &claims("999")),
            |r| matches!(r, TokenRefusal::OtherJob { claim, label } if claim == "999" && label == "302"),
        ),
        ("not a JWT", "not-a-jwt".into(), |r| {
            matches!(r, TokenRefusal::Malformed { .. })
        }),
    ];
    for (what, token, expected) in cases {
        let container = job_container("302", &[format!("AWS_ID_TOKEN={token}")], &[]);
        let r = refusal(v.check(&container).await);
        assert!(expected(&r), "{what}: {r:?}");
        // The reason never quotes the token.
        assert!(!r.to_string().contains(&token), "{what}: {r}");
    }
}

#[tokio::test]
async fn unsigned_and_symmetric_tokens_are_refused_before_any_key_is_looked_up() {
    let (v, table) = verifier("a");
    let body = |alg: &str| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(format!(r#"{{"alg":"{alg}","kid":"key-a"}}"#)),
            b64.encode(claims("302").to_string())
        )
    };
    let none = body("none");
    let r = refusal(
        v.check(&job_container(
            "302",
            &[format!("AWS_ID_TOKEN={none}")],
            &[],
        ))
        .await,
    );
    assert!(matches!(r, TokenRefusal::Malformed { .. }), "{r:?}");
    // HS256 keyed with something public: refused by algorithm.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("key-a".into());
    let hs = jsonwebtoken::encode(
        &header,
        &claims("302"),
        &EncodingKey::from_secret(b"the public key").unwrap(),
    )
    .unwrap();
    let r = refusal(
        v.check(&job_container("302", &[format!("AWS_ID_TOKEN={hs}")], &[]))
            .await,
    );
    assert!(matches!(r, TokenRefusal::Algorithm(_)), "{r:?}");
    assert_eq!(table.fetches.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_token_the_job_set_twice_or_the_image_brought_is_refused() {
    let (v, _) = verifier("a");
    let good = sign("a", "key-a", &claims("302"));
    let other = sign("a", "key-a", &with(claims("302"), "ref", "evil".into()));
    let twice = job_container(
        "302",
        &[
            format!("AWS_ID_TOKEN={good}"),
            format!("AWS_ID_TOKEN={other}"),
        ],
        &[],
    );
    assert_eq!(
        refusal(v.check(&twice).await),
        TokenRefusal::Conflicting("AWS_ID_TOKEN")
    );
    let env = [format!("AWS_ID_TOKEN={good}")];
    let from_image = job_container("302", &env, &env);
    assert_eq!(
        refusal(v.check(&from_image).await),
        TokenRefusal::FromImage("AWS_ID_TOKEN")
    );
    // A job label the image brought proves nothing.
    let mut c = job_container("302", &env, &[]);
    c.image_labels
        .insert(gitlab::JOB_LABEL.to_string(), "302".to_string());
    assert_eq!(refusal(v.check(&c).await), TokenRefusal::NoJobLabel);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_first_sight_and_unknown_ids_cannot_hammer_the_issuer() {
    let (v, table) = verifier("a");
    v.fetch(Duration::ZERO).await.unwrap();
    assert_eq!(table.fetches.load(Ordering::SeqCst), 1);
    // GitLab rotates: it now publishes a and b and signs with b.
    *table.set.lock().unwrap() = Ok(jwks("ab"));
    *v.last_fetch.lock().await = Some(Instant::now() - REFETCH_MIN);
    let by_b = sign("b", "key-b", &claims("302"));
    v.verify(&by_b, SystemTime::now()).await.unwrap();
    assert_eq!(table.fetches.load(Ordering::SeqCst), 2);
    // Unknown key ids within REFETCH_MIN cost no fetch at all.
    for i in 0..20 {
        let forged = sign("rogue", &format!("made-up-{i}"), &claims("302"));
        let r = v.verify(&forged, SystemTime::now()).await.unwrap_err();
        assert!(matches!(r, TokenRefusal::UnknownKey { .. }), "{r:?}");
    }
    assert_eq!(table.fetches.load(Ordering::SeqCst), 2);
    // The issuer drops a: tokens it signed stop verifying, even those
    // verified before.
    let by_a = sign("a", "key-a", &claims("302"));
    v.verify(&by_a, SystemTime::now()).await.unwrap();
    *table.set.lock().unwrap() = Ok(jwks("b"));
    v.fetch(Duration::ZERO).await.unwrap();
    let r = v.verify(&by_a, SystemTime::now()).await.unwrap_err();
    assert!(matches!(r, TokenRefusal::UnknownKey { .. }), "{r:?}");
}

#[tokio::test]
async fn an_issuer_outage_keeps_the_keys_known() {
    let (v, table) = verifier("a");
    let by_a = sign("a", "key-a", &claims("302"));
    // Never fetched and the issuer is down: the reason says so.
    *table.set.lock().unwrap() = Err("connection refused".into());
    let r = v.verify(&by_a, SystemTime::now()).await.unwrap_err();
    assert!(matches!(r, TokenRefusal::IssuerUnavailable(_)), "{r:?}");
    assert!(!v.ready());
    *table.set.lock().unwrap() = Ok(jwks("a"));
    v.fetch(Duration::ZERO).await.unwrap();
    assert!(v.ready());
    *table.set.lock().unwrap() = Err("connection refused".into());
    assert!(v.fetch(Duration::ZERO).await.is_err());
    v.verify(&by_a, SystemTime::now()).await.unwrap();
}

#[tokio::test]
async fn a_token_verified_once_still_expires() {
    let (v, _) = verifier("a");
    let token = sign("a", "key-a", &claims("302"));
    let t = v.verify(&token, SystemTime::now()).await.unwrap();
    let later = t.expires() + LEEWAY + Duration::from_secs(1);
    let r = v.verify(&token, later).await.unwrap_err();
    assert!(matches!(r, TokenRefusal::Expired { .. }), "{r:?}");
}
