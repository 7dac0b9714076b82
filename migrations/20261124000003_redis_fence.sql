-- The fence between Redis and Postgres (see docs/design.md, "Redis is a cache
-- with a fence"). Every (re)build of a coupon's Redis state raises
-- `redis_epoch`; `decided_seq` is the highest decision number stored. A batch
-- of decisions is stored only if it was taken on the current epoch and
-- numbered past `decided_seq`; anything else was decided on a Redis state
-- that was wiped, rolled back or replaced, and is decided again.
ALTER TABLE coupon
    ADD COLUMN redis_epoch bigint NOT NULL DEFAULT 0,
    ADD COLUMN decided_seq bigint NOT NULL DEFAULT 0;
