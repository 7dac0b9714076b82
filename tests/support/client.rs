//! Talking to an ingress over HTTP, and reading `/metrics`.

use super::*;

/// A thin HTTP client of the public API.
#[derive(Clone)]
pub struct Client {
    /// The connection pool, for requests the helpers below do not cover.
    pub http: reqwest::Client,
    /// `http://host:port`.
    pub base: String,
    /// Sent on the admin calls.
    pub(crate) admin_token: String,
}

impl Client {
    /// Creates a coupon with the admin token; returns the status and body.
    pub async fn create_coupon(&self, id: &str, stock: i64) -> (u16, Value) {
        self.create_coupon_with(json!({
            "coupon_id": id, "name": format!("coupon {id}"), "total_stock": stock,
            "starts_at": null, "ends_at": null,
        }))
        .await
    }

    /// Creates a coupon from a raw body with the admin token.
    pub async fn create_coupon_with(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/coupons", self.base))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// `POST /v1/coupons/{id}/issue`.
    pub async fn issue(&self, coupon: &str, user: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/coupons/{coupon}/issue", self.base))
            .json(&json!({ "user_id": user }))
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// `GET` a path of the API.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// `GET` a path of the API with a bearer token.
    pub async fn get_with_token(&self, path: &str, token: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// Polls a request until its status is final; panics after `limit`.
    pub async fn wait_final(&self, request_id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (code, body) = self.get(&format!("/v1/issue-requests/{request_id}")).await;
            assert_eq!(code, 200, "status lookup of {request_id}: {body}");
            if body["status"] != "pending" {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {request_id} still pending after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Status code and JSON body (or `null` for an empty body).
pub async fn split(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON: {text}"))
    };
    (code, body)
}

/// One scrape: every sample line as `name{labels}` → value, and the raw text.
pub struct Scrape {
    /// Every sample: `name{labels}` → value.
    pub samples: HashMap<String, f64>,
    /// The exposition as served.
    pub text: String,
}

impl Scrape {
    /// Scrapes the `/metrics` of the operations port at `addr`.
    pub async fn of(addr: SocketAddr) -> Self {
        let answer = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("the metrics port answers");
        assert_eq!(answer.status(), 200);
        let content_type = answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        Self::parse(answer.text().await.unwrap())
    }

    /// Scrapes the `/metrics` at `addr` if it answers within `limit`; `None`
    /// for a process that is down or frozen.
    pub async fn try_of(addr: SocketAddr, limit: Duration) -> Option<Self> {
        tokio::time::timeout(limit, async {
            let answer = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
            if answer.status() != 200 {
                return None;
            }
            let text = answer.text().await.ok()?;
            Some(Self::parse(text))
        })
        .await
        .ok()
        .flatten()
    }

    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample is `series value`");
                (series.to_owned(), value.parse().expect("a numeric value"))
            })
            .collect();
        Self { samples, text }
    }

    /// The value of one series, 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over every series of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether the exposition names the metric (a sample, or its
    /// `# TYPE` line for a family with no label set yet).
    pub fn names(&self, exposed: &str) -> bool {
        self.samples
            .keys()
            .any(|s| s.split('{').next() == Some(exposed))
            || self.text.lines().any(|l| {
                l.starts_with("# TYPE ") && exposed.starts_with(l.split(' ').nth(2).unwrap())
            })
    }
}
