//! The names of the Redis keys: every key of a coupon under one prefix
//! (the layout is in [`crate::state`]'s docs). A value type the engine, the
//! status cache and the settings share, so none of them imports the other.

use crate::ids::CouponId;

/// The key prefix is not usable.
#[derive(Debug, thiserror::Error)]
#[error("redis key prefix {0:?} must not contain '{{' or '}}' (they would break the hash tags)")]
pub struct BadPrefix(pub String);

/// Builds every key of the layout above for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`, which must not contain braces.
    pub fn new(prefix: impl Into<String>) -> Result<Self, BadPrefix> {
        let prefix = prefix.into();
        if prefix.contains(['{', '}']) {
            return Err(BadPrefix(prefix));
        }
        Ok(Self { prefix })
    }

    /// The keys of one coupon.
    pub fn coupon(&self, coupon: &CouponId) -> CouponKeys {
        // Concatenated rather than formatted: every batch and every
        // accepted request builds them (docs/benchmarks.md counts it).
        let base = self.base(coupon);
        let key = |suffix: &str| [base.as_str(), suffix].concat();
        CouponKeys {
            meta: key(":meta"),
            stock: key(":stock"),
            users: key(":users"),
            decided: key(":decided"),
            accepted: key(":accepted"),
            base,
        }
    }

    /// The coupon's count of accepted requests alone (the ingress adds one
    /// per request), the same as `coupon(c).accepted`.
    pub fn accepted(&self, coupon: &CouponId) -> String {
        [self.base(coupon).as_str(), ":accepted"].concat()
    }

    /// `{prefix}coupon:{C}`: the hash tag keeps a coupon's keys in one slot.
    fn base(&self, coupon: &CouponId) -> String {
        [self.prefix.as_str(), "coupon:{", coupon.as_str(), "}"].concat()
    }

    /// The prefix, for the keys other modules own (request statuses in
    /// [`crate::status`], the ingress's idempotency keys).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The keys of one coupon (see the module docs).
#[derive(Debug, Clone)]
pub struct CouponKeys {
    base: String,
    /// Epoch, sequence, window and total; its epoch marks the state as installed.
    pub meta: String,
    /// Units left.
    pub stock: String,
    /// Users holding the coupon.
    pub users: String,
    /// Record id → outcome, decision time and number.
    pub decided: String,
    /// Requests the ingress saw acknowledged (for the admin counters; not
    /// part of the decision state).
    pub accepted: String,
}

impl CouponKeys {
    /// The staging keys (users, decisions) of a state of `epoch` being built.
    pub(crate) fn staging(&self, epoch: i64) -> (String, String) {
        (
            format!("{}:next:{epoch}:users", self.base),
            format!("{}:next:{epoch}:decided", self.base),
        )
    }
}
