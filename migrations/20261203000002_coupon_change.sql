-- Every admin change to a coupon, applied exactly once (the change id is
-- the key; a retry with the same id finds it here and changes nothing). The
-- change commits in one transaction with the coupon row and a new
-- `redis_epoch`, under the row's lock, so it sits at one exact place in the
-- coupon's stored decisions: every decision stored before it was taken
-- without it, every decision stored after it with it (one taken on the old
-- state carries the old epoch and is refused). `after_offset` is that place
-- in the log: the highest offset of the coupon's records stored before it.
CREATE TABLE coupon_change (
    change_id    uuid PRIMARY KEY,
    coupon_id    text NOT NULL REFERENCES coupon,
    kind         text NOT NULL CHECK (kind IN ('add_stock', 'close', 'reopen')),
    detail       jsonb NOT NULL,
    token_id     text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    after_offset bigint
);
CREATE INDEX coupon_change_by_coupon ON coupon_change (coupon_id, applied_at);
