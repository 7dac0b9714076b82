-- The system of record. Redis holds a fast copy that can be rebuilt from here.

-- A coupon campaign, created through the admin API.
CREATE TABLE coupon (
    coupon_id   text PRIMARY KEY CHECK (coupon_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    total_stock integer NOT NULL CHECK (total_stock >= 0),
    starts_at   timestamptz,
    ends_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (starts_at IS NULL OR ends_at IS NULL OR starts_at <= ends_at)
);

-- One row per decided request: the final status of every accepted request,
-- with where it sat in the log. Written once (ON CONFLICT DO NOTHING), so a
-- redelivered record never changes an earlier decision.
CREATE TABLE request_ledger (
    request_id      uuid PRIMARY KEY,
    coupon_id       text NOT NULL REFERENCES coupon,
    user_id         text NOT NULL,
    status          text NOT NULL CHECK (status IN ('issued', 'duplicate', 'sold_out', 'not_open')),
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    accepted_at     timestamptz NOT NULL,
    decided_at      timestamptz NOT NULL
);
CREATE INDEX request_ledger_coupon_log_order ON request_ledger (coupon_id, kafka_partition, kafka_offset);

-- The coupons users hold. The primary key is the last line of defence
-- against issuing one coupon twice to the same user.
CREATE TABLE user_coupon (
    coupon_id  text NOT NULL REFERENCES coupon,
    user_id    text NOT NULL,
    request_id uuid NOT NULL UNIQUE,
    issued_at  timestamptz NOT NULL,
    PRIMARY KEY (coupon_id, user_id)
);
CREATE INDEX user_coupon_by_user ON user_coupon (user_id, issued_at);
