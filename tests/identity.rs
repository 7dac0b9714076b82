//! The user an issue request is for comes from something the client cannot
//! forge: a signed token checked against a JWKS document that can rotate, or
//! a header only a trusted gateway may set. Whatever fails verification is
//! `401` (or `403` for another user's name) and appends nothing.

use std::time::Duration;

use firstcome_ingress::config::IdentityMode;
use firstcome_suite::tokens::{self, AUDIENCE, ISSUER, TestKey, claims_for};
use firstcome_suite::{TestEnv, split};
use serde_json::{Value, json};

/// `POST issue` with an optional bearer token and a body.
async fn issue(
    client: &firstcome_suite::Client,
    coupon: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut r = client
        .http
        .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
        .json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    split(r.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_token_signed_by_a_current_key_for_this_audience_names_the_user() {
    let env = TestEnv::new().await;
    let (a, b) = (TestKey::load("a"), TestKey::load("b"));
    let jwks = tokens::jwks_path(&env.tag);
    tokens::write_jwks(&jwks, &[&a]);
    let mut cfg = env.ingress_config();
    cfg.identity = IdentityMode::Jwt;
    cfg.jwks_file = Some(jwks.clone());
    cfg.jwt_issuer = Some(ISSUER.to_owned());
    cfg.jwt_audience = Some(AUDIENCE.to_owned());
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("verified");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);

    let now = chrono::Utc::now().timestamp();
    let mut wrong_aud = claims_for("ann", 3_600);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims_for("ann", 3_600);
    wrong_iss["iss"] = json!("https://evil.invalid/");
    let mut early = claims_for("ann", 3_600);
    early["nbf"] = json!(now + 600);
    let mut no_aud = claims_for("ann", 3_600);
    no_aud.as_object_mut().unwrap().remove("aud");
    let valid = a.token_for("ann");
    // Another user's claims under ann's signature.
    let parts: Vec<&str> = valid.split('.').collect();
    let other = a.token_for("mallory");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    let refused: Vec<(&str, Option<String>, Value, u16)> = vec![
        ("no token", None, json!({"user_id": "ann"}), 401),
        ("not a JWT", Some("garbage".into()), json!({}), 401),
        ("unknown key", Some(b.token_for("ann")), json!({}), 401),
        ("tampered claims", Some(tampered), json!({}), 401),
        (
            "expired",
            Some(a.sign(&claims_for("ann", -3_600))),
            json!({}),
            401,
        ),
        ("not valid yet", Some(a.sign(&early)), json!({}), 401),
        ("wrong audience", Some(a.sign(&wrong_aud)), json!({}), 401),
        ("no audience", Some(a.sign(&no_aud)), json!({}), 401),
        ("wrong issuer", Some(a.sign(&wrong_iss)), json!({}), 401),
        (
            "sub not a user id",
            Some(a.token_for("ann@example")),
            json!({}),
            401,
        ),
        (
            "another user in the body",
            Some(valid.clone()),
            json!({"user_id": "bob"}),
            403,
        ),
    ];
    for (what, token, body, want) in refused {
        let (code, err) = issue(&client, &coupon, token.as_deref(), body).await;
        assert_eq!(code, want, "{what}: {err}");
        let code_word = if want == 401 {
            "unauthorized"
        } else {
            "forbidden"
        };
        assert_eq!(err["error"]["code"], code_word, "{what}: {err}");
    }
    assert!(
        env.read_request_log().is_empty(),
        "nothing refused was appended"
    );

    // A valid token names the user; the body may leave it out or repeat it.
    let (code, first) = issue(&client, &coupon, Some(&valid), json!({})).await;
    assert_eq!(code, 202, "{first}");
    let (code, again) = issue(&client, &coupon, Some(&valid), json!({"user_id": "ann"})).await;
    assert_eq!(code, 202, "{again}");
    let id = first["request_id"].as_str().unwrap();
    let (code, status) = client.get(&format!("/v1/issue-requests/{id}")).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["user_id"], "ann");
    assert_eq!(env.read_request_log().len(), 2);

    // Holdings are the user's own.
    let holdings = |user: &str, token: &str| {
        let client = client.clone();
        let (user, token) = (user.to_owned(), token.to_owned());
        async move {
            split(
                client
                    .http
                    .get(format!("{}/v1/users/{user}/coupons", client.base))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
            .0
        }
    };
    assert_eq!(holdings("ann", &valid).await, 200);
    assert_eq!(holdings("bob", &valid).await, 403);
    let (code, _) = client.get("/v1/users/ann/coupons").await;
    assert_eq!(code, 401, "no token, no holdings");

    // The keys rotate without a restart: b in, a out.
    tokens::write_jwks(&jwks, &[&b]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = issue(&client, &coupon, Some(&b.token_for("cat")), json!({})).await;
        if code == 202 {
            break;
        }
        assert_eq!(code, 401, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was never taken"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, err) = issue(&client, &coupon, Some(&a.token_for("dan")), json!({})).await;
    assert_eq!(code, 401, "the retired key is refused: {err}");
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_user_header_is_believed_only_from_the_gateway() {
    let env = TestEnv::new().await;
    let mut cfg = env.ingress_config();
    cfg.identity = IdentityMode::Header;
    cfg.user_header = Some("x-authenticated-user".into());
    cfg.trusted_proxies = vec!["127.0.0.1".into()];
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let coupon = env.coupon_id("gateway");
    assert_eq!(client.create_coupon(&coupon, 10).await.0, 201);
    let send = |user: Option<&str>, body: Value| {
        let mut r = client
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
            .json(&body);
        if let Some(u) = user {
            r = r.header("x-authenticated-user", u);
        }
        async move { split(r.send().await.unwrap()).await }
    };
    let (code, ok) = send(Some("eve"), json!({})).await;
    assert_eq!(code, 202, "{ok}");
    let (code, err) = send(None, json!({"user_id": "eve"})).await;
    assert_eq!(code, 401, "{err}");
    let (code, err) = send(Some("eve"), json!({"user_id": "frank"})).await;
    assert_eq!(code, 403, "{err}");
    let (code, err) = send(Some("not a user!"), json!({})).await;
    assert_eq!(code, 401, "{err}");
    ingress.stop().await;

    // From a peer that is not the gateway, the header names nobody.
    let mut cfg = env.ingress_config();
    cfg.identity = IdentityMode::Header;
    cfg.user_header = Some("x-authenticated-user".into());
    cfg.trusted_proxies = vec!["10.0.0.0/8".into()];
    let ingress = env.spawn_ingress_with(cfg).await;
    let client = env.client(&ingress);
    let (code, err) = split(
        client
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", client.base))
            .header("x-authenticated-user", "eve")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401, "{err}");
    assert_eq!(
        env.read_request_log().len(),
        1,
        "only the gateway's request"
    );
    ingress.stop().await;
}
