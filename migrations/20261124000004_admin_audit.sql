-- Every admin action: who (the id of the admin token used, never the token),
-- what, on which coupon, with what, and when.
CREATE TABLE admin_audit (
    audit_id  bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    token_id  text NOT NULL,
    action    text NOT NULL,
    coupon_id text,
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX admin_audit_by_coupon ON admin_audit (coupon_id, at);
