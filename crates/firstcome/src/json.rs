//! The JSON of the two documents written per request, the record
//! ([`IssueRequest::to_json`]) and the status ([`RequestStatus::to_json`]),
//! written by hand: every string in them is an id of `[A-Za-z0-9_-]`, a
//! UUID, a status name or a timestamp, none of which JSON escapes, so the
//! pass serde_json makes over every byte to escape it (3,800 of the
//! ingress's 6,200 JSON instructions per request, counted; docs/benchmarks.md)
//! is skipped. The bytes are serde_json's (the tests compare them on random
//! documents); reading stays serde's.

use chrono::{DateTime, Utc};

use crate::record::IssueRequest;
use crate::status::RequestStatus;
use crate::time;

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

    /// A string that needs no escaping (checked in debug builds).
    fn plain(&mut self, key: &str, value: &str) {
        debug_assert!(
            value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{value:?} needs escaping"
        );
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    fn time(&mut self, key: &str, t: &DateTime<Utc>) {
        let mut buf = [0; time::MAX_LEN];
        match time::write(t, &mut buf) {
            Some(text) => self.plain(key, text),
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
        o.plain("request_id", self.request_id.encode(&mut [0; 36]));
        o.plain("coupon_id", self.coupon_id.as_str());
        o.plain("user_id", self.user_id.as_str());
        o.time("accepted_at", &self.accepted_at);
        o.finish()
    }
}

impl RequestStatus {
    /// The JSON kept under `req:{R}` (also what a lookup answers).
    pub fn to_json(&self) -> Vec<u8> {
        let mut o = Object::new(160 + self.coupon_id.as_str().len() + self.user_id.as_str().len());
        o.plain("request_id", self.request_id.encode(&mut [0; 36]));
        o.plain("coupon_id", self.coupon_id.as_str());
        o.plain("user_id", self.user_id.as_str());
        o.plain("status", self.status.as_str());
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
    use crate::record::Status;
    use crate::{CouponId, RequestId, UserId};

    /// Random ids of every length and character, times of every precision.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn id(&mut self) -> String {
            const CHARS: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
            let len = 1 + (self.next() % 64) as usize;
            (0..len)
                .map(|_| CHARS[(self.next() % 64) as usize] as char)
                .collect()
        }

        fn time(&mut self) -> DateTime<Utc> {
            let seconds = (self.next() % 4_000_000_000) as i64;
            let nanos = match self.next() % 3 {
                0 => 0,
                1 => (self.next() % 1_000_000) * 1_000,
                _ => self.next() % 1_000_000_000,
            } as u32;
            Utc.timestamp_opt(seconds, nanos).unwrap()
        }

        fn request(&mut self) -> IssueRequest {
            IssueRequest {
                request_id: RequestId::new(),
                coupon_id: CouponId::parse(self.id()).unwrap(),
                user_id: UserId::parse(self.id()).unwrap(),
                accepted_at: self.time(),
            }
        }
    }

    #[test]
    fn records_are_written_as_serde_json_writes_them_and_read_back() {
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        let mut requests: Vec<_> = (0..10_000).map(|_| random.request()).collect();
        requests[0].accepted_at = Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap();
        for r in &requests {
            let ours = r.to_json();
            assert_eq!(ours, serde_json::to_vec(r).unwrap(), "{r:?}");
            assert_eq!(&IssueRequest::from_json(&ours).unwrap(), r);
        }
    }

    #[test]
    fn statuses_are_written_as_serde_json_writes_them_and_read_back() {
        let mut random = Random(0x2545_F491_4F6C_DD1D);
        for i in 0..10_000 {
            let r = random.request();
            let status = match i % 7 {
                0 => RequestStatus::pending(&r),
                1 => RequestStatus::pending(&r).at_offset(random.0 as i64 >> (i % 60)),
                n => RequestStatus::decided(
                    &r,
                    Decision {
                        status: Status::FINAL[n % Status::FINAL.len()],
                        decided_at: random.time(),
                    },
                ),
            };
            let ours = status.to_json();
            assert_eq!(ours, serde_json::to_vec(&status).unwrap(), "{status:?}");
            assert_eq!(
                serde_json::from_slice::<RequestStatus>(&ours).unwrap(),
                status
            );
        }
    }
}
