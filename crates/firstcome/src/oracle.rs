//! The first-come rule as a pure function of the log: what every request
//! of a request topic must have been decided, replayed in log order. The
//! test suite, the soak and the benchmark check the system against it; it
//! knows nothing of Redis, Postgres or the worker.
//!
//! Per coupon, in the order of its partition:
//! - a record of a request decided earlier in the log (a replayed dead
//!   letter, a producer's retry) decides nothing new;
//! - a request accepted outside the window in force at its place is
//!   `not_open`;
//! - a user who holds the coupon already gets `duplicate`;
//! - otherwise `issued` while stock lasts, then `sold_out`.
//!
//! An admin change applies to the records of its coupon after the offset it
//! names (`coupon_change.after_offset`); a close ends the window then (and
//! starts it there too, if it had not opened). A record whose position was
//! dead-lettered decides nothing; a `permanent_failure` leaves its request
//! `failed` unless a later copy of it is decided.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::record::{IssueRequest, Status};

/// One record of the request topic, as read back.
#[derive(Debug, Clone)]
pub struct Logged {
    /// With `offset`, where the record sits: the order that decides, and
    /// what a dead letter names.
    pub partition: i32,
    /// See `partition`; admin changes take effect after an offset.
    pub offset: i64,
    /// The key, which must be the coupon id of the value.
    pub key: Option<Vec<u8>>,
    /// The value, an issue request as JSON when the ingress wrote it.
    pub payload: Option<Vec<u8>>,
}

/// An admin change to a coupon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// More units.
    AddStock(i64),
    /// The window ends then, unless earlier already.
    Close(DateTime<Utc>),
    /// The window ends then (`None`: never).
    Reopen(Option<DateTime<Utc>>),
}

/// What decides a coupon's requests.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Stock at creation.
    pub stock: i64,
    /// Start of the window at creation.
    pub starts_at: Option<DateTime<Utc>>,
    /// End of the window at creation.
    pub ends_at: Option<DateTime<Utc>>,
    /// The admin changes in the order they were applied, each with the
    /// highest offset stored before it (`None`: before any record).
    pub changes: Vec<(Option<i64>, Change)>,
}

impl Rules {
    /// A coupon with `stock` units, no window and no changes.
    pub fn stock(stock: i64) -> Self {
        Self {
            stock,
            ..Self::default()
        }
    }
}

/// The decisions the log implies.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records in the log.
    pub records: usize,
    /// Request ids of every record that holds a request.
    pub logged: HashSet<String>,
    /// Request id → (status, partition, offset of the deciding record).
    pub expected: HashMap<String, (Status, i32, i64)>,
    /// Per coupon: the users issued, in log order.
    pub winners: HashMap<String, Vec<String>>,
    /// Dead-lettered records, by kind.
    pub dead: HashMap<String, usize>,
    /// Request ids of dead-lettered records that hold one.
    pub dead_ids: HashSet<String>,
    /// Per coupon: the partitions its records sit in.
    pub partitions: HashMap<String, HashSet<i32>>,
    /// Positions of records that hold no request, or one for a coupon
    /// without rules, that no dead letter explains.
    pub unexplained: Vec<(i32, i64)>,
}

/// A coupon's rules as they stand at some place in its log.
struct Live<'a> {
    rules: &'a Rules,
    stock: i64,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
    /// The next change to apply.
    next: usize,
    holders: HashSet<String>,
}

impl Live<'_> {
    /// Applies the changes that took effect before `offset`.
    fn advance_to(&mut self, offset: i64) {
        while let Some((after, change)) = self.rules.changes.get(self.next) {
            if after.is_some_and(|a| a >= offset) {
                break;
            }
            match change {
                Change::AddStock(n) => self.stock += n,
                Change::Close(t) => {
                    self.ends_at = Some(self.ends_at.map_or(*t, |e| e.min(*t)));
                    // Before the window opened: it starts and ends there.
                    if self.starts_at.is_some_and(|s| s > *t) {
                        self.starts_at = Some(*t);
                    }
                }
                Change::Reopen(e) => self.ends_at = *e,
            }
            self.next += 1;
        }
    }

    /// Decides a request at the current place.
    fn decide(&mut self, r: &IssueRequest) -> Status {
        if self.starts_at.is_some_and(|s| r.accepted_at < s)
            || self.ends_at.is_some_and(|e| r.accepted_at > e)
        {
            Status::NotOpen
        } else if self.holders.contains(r.user_id.as_str()) {
            Status::Duplicate
        } else if (self.holders.len() as i64) < self.stock {
            self.holders.insert(r.user_id.to_string());
            Status::Issued
        } else {
            Status::SoldOut
        }
    }
}

/// The request a record holds, if its value is one and its key matches.
fn request(rec: &Logged) -> Option<IssueRequest> {
    rec.payload
        .as_deref()
        .and_then(|p| IssueRequest::from_json(p).ok())
        .filter(|r| rec.key.as_deref() == Some(r.coupon_id.as_str().as_bytes()))
}

/// Replays `log` (in each partition's order) under `rules` (by coupon id),
/// with `dead` the dead-lettered positions and their kinds.
pub fn replay(
    log: impl IntoIterator<Item = Logged>,
    dead: &HashMap<(i32, i64), String>,
    rules: &HashMap<String, Rules>,
) -> Replay {
    let mut live: HashMap<&str, Live<'_>> = rules
        .iter()
        .map(|(c, r)| {
            let state = Live {
                rules: r,
                stock: r.stock,
                starts_at: r.starts_at,
                ends_at: r.ends_at,
                next: 0,
                holders: HashSet::new(),
            };
            (c.as_str(), state)
        })
        .collect();
    let mut m = Replay::default();
    for rec in log {
        m.records += 1;
        let at = (rec.partition, rec.offset);
        let parsed = request(&rec);
        if let Some(kind) = dead.get(&at) {
            *m.dead.entry(kind.clone()).or_default() += 1;
            if let Some(r) = parsed {
                let id = r.request_id.to_string();
                m.logged.insert(id.clone());
                m.dead_ids.insert(id.clone());
                if kind == "permanent_failure" {
                    m.expected.entry(id).or_insert((Status::Failed, at.0, at.1));
                }
            }
            continue;
        }
        let Some(r) = parsed else {
            m.unexplained.push(at);
            continue;
        };
        let id = r.request_id.to_string();
        m.logged.insert(id.clone());
        m.partitions
            .entry(r.coupon_id.to_string())
            .or_default()
            .insert(rec.partition);
        let Some(state) = live.get_mut(r.coupon_id.as_str()) else {
            m.unexplained.push(at);
            continue;
        };
        state.advance_to(rec.offset);
        if matches!(m.expected.get(&id), Some((s, _, _)) if *s != Status::Failed) {
            continue; // decided earlier in the log
        }
        let status = state.decide(&r);
        if status == Status::Issued {
            m.winners
                .entry(r.coupon_id.to_string())
                .or_default()
                .push(r.user_id.to_string());
        }
        m.expected.insert(id, (status, at.0, at.1));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CouponId, RequestId, UserId};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    /// A log of `(user, accepted second)` requests for coupon `c`, offsets
    /// from 0, and their ids.
    fn log(users: &[(&str, i64)]) -> (Vec<Logged>, Vec<String>) {
        let mut ids = Vec::new();
        let recs = users
            .iter()
            .enumerate()
            .map(|(i, (user, second))| {
                let r = IssueRequest {
                    request_id: RequestId::new(),
                    coupon_id: CouponId::parse("c").unwrap(),
                    user_id: UserId::parse(*user).unwrap(),
                    accepted_at: at(*second),
                };
                ids.push(r.request_id.to_string());
                Logged {
                    partition: 0,
                    offset: i as i64,
                    key: Some(b"c".to_vec()),
                    payload: Some(r.to_json()),
                }
            })
            .collect();
        (recs, ids)
    }

    fn statuses(m: &Replay, ids: &[String]) -> Vec<&'static str> {
        ids.iter().map(|id| m.expected[id].0.as_str()).collect()
    }

    fn one(rules: Rules) -> HashMap<String, Rules> {
        HashMap::from([("c".to_owned(), rules)])
    }

    #[test]
    fn the_first_stock_distinct_users_win_and_a_holder_asking_again_is_a_duplicate() {
        let (recs, ids) = log(&[("a", 0), ("a", 1), ("b", 2), ("c", 3), ("b", 4)]);
        let m = replay(recs, &HashMap::new(), &one(Rules::stock(2)));
        assert_eq!(
            statuses(&m, &ids),
            ["issued", "duplicate", "issued", "sold_out", "duplicate"]
        );
        assert_eq!(m.winners["c"], ["a", "b"]);
        assert!(m.unexplained.is_empty());
    }

    #[test]
    fn a_second_copy_of_a_request_decides_nothing_new() {
        let (mut recs, ids) = log(&[("a", 0), ("b", 1)]);
        let copy = Logged {
            offset: 2,
            ..recs[0].clone()
        };
        recs.push(copy);
        let m = replay(recs, &HashMap::new(), &one(Rules::stock(1)));
        assert_eq!(statuses(&m, &ids), ["issued", "sold_out"]);
        assert_eq!(m.expected[&ids[0]], (Status::Issued, 0, 0));
    }

    #[test]
    fn added_stock_counts_only_after_its_offset_and_a_close_ends_the_window() {
        let (recs, ids) = log(&[("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 10)]);
        let rules = Rules {
            stock: 1,
            changes: vec![
                (Some(1), Change::AddStock(1)),
                (Some(3), Change::Close(at(5))),
            ],
            ..Rules::default()
        };
        let m = replay(recs, &HashMap::new(), &one(rules));
        assert_eq!(
            statuses(&m, &ids),
            ["issued", "sold_out", "issued", "sold_out", "not_open"]
        );
    }

    #[test]
    fn a_reopen_lifts_a_close_and_a_window_not_yet_open_refuses() {
        let (recs, ids) = log(&[("a", 0), ("b", 20), ("c", 30)]);
        let rules = Rules {
            stock: 5,
            starts_at: Some(at(10)),
            changes: vec![
                (Some(0), Change::Close(at(15))),
                (Some(1), Change::Reopen(None)),
            ],
            ..Rules::default()
        };
        let m = replay(recs, &HashMap::new(), &one(rules));
        assert_eq!(statuses(&m, &ids), ["not_open", "not_open", "issued"]);
    }

    #[test]
    fn a_close_before_the_window_opens_keeps_it_shut_past_its_old_start() {
        let (recs, ids) = log(&[("a", 1), ("b", 12), ("c", 30)]);
        let rules = Rules {
            stock: 5,
            starts_at: Some(at(10)),
            changes: vec![(None, Change::Close(at(5)))],
            ..Rules::default()
        };
        let m = replay(recs, &HashMap::new(), &one(rules));
        assert_eq!(statuses(&m, &ids), ["not_open", "not_open", "not_open"]);
    }

    #[test]
    fn a_dead_lettered_position_decides_nothing_and_a_permanent_failure_is_failed() {
        let (mut recs, ids) = log(&[("a", 0), ("b", 1), ("c", 2)]);
        recs.push(Logged {
            partition: 0,
            offset: 3,
            key: Some(b"c".to_vec()),
            payload: Some(b"not json".to_vec()),
        });
        let dead = HashMap::from([
            ((0, 0), "permanent_failure".to_owned()),
            ((0, 3), "invalid_record".to_owned()),
        ]);
        let m = replay(recs, &dead, &one(Rules::stock(1)));
        assert_eq!(statuses(&m, &ids), ["failed", "issued", "sold_out"]);
        assert_eq!(m.dead["invalid_record"], 1);
        assert!(m.dead_ids.contains(&ids[0]));
        assert!(m.unexplained.is_empty());
    }

    #[test]
    fn a_record_under_another_key_or_of_an_unknown_coupon_is_unexplained() {
        let (mut recs, _) = log(&[("a", 0), ("b", 1)]);
        recs[0].key = Some(b"other".to_vec());
        let m = replay(recs, &HashMap::new(), &HashMap::new());
        assert_eq!(m.unexplained, [(0, 0), (0, 1)]);
    }
}
