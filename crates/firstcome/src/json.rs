//! The JSON of the two documents written per request, the record
//! ([`IssueRequest::to_json`]) and the status ([`RequestStatus::to_json`]),
//! written by hand: every string in them is an id of `[A-Za-z0-9_-]`, a
//! UUID, a status name or a timestamp, none of which JSON escapes, so the
//! pass serde_json makes over every byte to escape it (3,800 of the
//! ingress's 6,200 JSON instructions per request, counted; docs/benchmarks.md)
//! is skipped. The bytes are serde_json's (the tests compare them on random
//! documents); reading stays serde's.

use chrono::{DateTime, Utc};

use crate::ids::{CouponId, RequestId, UserId};
use crate::record::{IssueRequest, Status};
use crate::status::RequestStatus;
use crate::time;

/// Text JSON writes as it is, made only from what holds no character JSON
/// escapes: ids (their characters are checked when parsed), UUIDs, status
/// names and timestamps as `time` writes them.
struct Plain<'a>(&'a str);

impl<'a> From<&'a CouponId> for Plain<'a> {
    fn from(id: &'a CouponId) -> Self {
        Plain(id.as_str())
    }
}

impl<'a> From<&'a UserId> for Plain<'a> {
    fn from(id: &'a UserId) -> Self {
        Plain(id.as_str())
    }
}

impl From<Status> for Plain<'static> {
    fn from(status: Status) -> Self {
        Plain(status.as_str())
    }
}

impl<'a> Plain<'a> {
    /// A request id, written into `buf`.
    fn uuid(id: RequestId, buf: &'a mut [u8; 36]) -> Self {
        Plain(id.encode(buf))
    }
}

/// One JSON object being written.
struct Object {
    out: Vec<u8>,
}

impl Object {
    fn new(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        Self { out }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string that needs no escaping: [`Plain`] says why it does not.
    fn plain(&mut self, key: &str, value: Plain<'_>) {
        debug_assert!(
            value
                .0
                .bytes()
                .all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{:?} needs escaping",
            value.0
        );
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.0.as_bytes());
        self.out.push(b'"');
    }

    fn time(&mut self, key: &str, t: &DateTime<Utc>) {
        let mut buf = [0; time::MAX_LEN];
        match time::write(t, &mut buf) {
            Some(text) => self.plain(key, Plain(text)),
            // Outside what `time` writes (years past 9999, leap seconds).
            None => {
                self.key(key);
                serde_json::to_writer(&mut self.out, t).expect("a timestamp serializes");
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

impl IssueRequest {
    /// The JSON value written to Kafka.
    pub fn to_json(&self) -> Vec<u8> {
        let mut o = Object::new(96 + self.coupon_id.as_str().len() + self.user_id.as_str().len());
        o.plain("request_id", Plain::uuid(self.request_id, &mut [0; 36]));
        o.plain("coupon_id", (&self.coupon_id).into());
        o.plain("user_id", (&self.user_id).into());
        o.time("accepted_at", &self.accepted_at);
        o.finish()
    }
}

impl RequestStatus {
    /// The JSON kept under `req:{R}` (also what a lookup answers).
    pub fn to_json(&self) -> Vec<u8> {
        let mut o = Object::new(160 + self.coupon_id.as_str().len() + self.user_id.as_str().len());
        o.plain("request_id", Plain::uuid(self.request_id, &mut [0; 36]));
        o.plain("coupon_id", (&self.coupon_id).into());
        o.plain("user_id", (&self.user_id).into());
        o.plain("status", self.status.into());
        o.time("accepted_at", &self.accepted_at);
        match &self.decided_at {
            Some(t) => o.time("decided_at", t),
            None => {
                o.key("decided_at");
                o.out.extend_from_slice(b"null");
            }
        }
        if let Some(offset) = self.log_offset {
            o.key("log_offset");
            serde_json::to_writer(&mut o.out, &offset).expect("an integer serializes");
        }
        o.finish()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::decision::Decision;
    use crate::ids::{CouponId, RequestId, UserId};
    use crate::record::Status;

    use proptest::prelude::*;

    /// Ids of every length and character an id may hold.
    fn id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,64}"
    }

    /// Times of every precision chrono writes: whole seconds, milli-,
    /// micro- and nanoseconds, and years past 9999 (chrono's own text).
    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        let nanos = prop_oneof![
            Just(0u32),
            (0u32..1_000).prop_map(|ms| ms * 1_000_000),
            (0u32..1_000_000).prop_map(|us| us * 1_000),
            0u32..1_000_000_000,
        ];
        let seconds = prop_oneof![
            9 => 0i64..4_000_000_000,
            1 => Just(Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap().timestamp()),
        ];
        (seconds, nanos).prop_map(|(s, n)| Utc.timestamp_opt(s, n).unwrap())
    }

    fn request() -> impl Strategy<Value = IssueRequest> {
        (id(), id(), time()).prop_map(|(coupon, user, accepted_at)| IssueRequest {
            request_id: RequestId::new(),
            coupon_id: CouponId::parse(coupon).unwrap(),
            user_id: UserId::parse(user).unwrap(),
            accepted_at,
        })
    }

    fn status() -> impl Strategy<Value = RequestStatus> {
        prop_oneof![
            request().prop_map(|r| RequestStatus::pending(&r)),
            (request(), any::<i64>()).prop_map(|(r, o)| RequestStatus::pending(&r).at_offset(o)),
            (request(), 0..Status::FINAL.len(), time()).prop_map(|(r, s, decided_at)| {
                RequestStatus::decided(
                    &r,
                    Decision {
                        status: Status::FINAL[s],
                        decided_at,
                    },
                )
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        #[test]
        fn records_are_written_as_serde_json_writes_them_and_read_back(r in request()) {
            let ours = r.to_json();
            prop_assert_eq!(&ours, &serde_json::to_vec(&r).unwrap());
            prop_assert_eq!(IssueRequest::from_json(&ours).unwrap(), r);
        }

        #[test]
        fn statuses_are_written_as_serde_json_writes_them_and_read_back(status in status()) {
            let ours = status.to_json();
            prop_assert_eq!(&ours, &serde_json::to_vec(&status).unwrap());
            prop_assert_eq!(serde_json::from_slice::<RequestStatus>(&ours).unwrap(), status);
        }
    }
}
