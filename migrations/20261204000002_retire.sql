-- A coupon's Redis state leaves Redis once its sale is over and every
-- record of it is stored (docs/design.md, "A coupon's state leaves Redis"):
-- `retire_offset` is the end of the coupon's partition as read once the sale
-- was over, at `retire_epoch`; once the consumer group has stored everything
-- before it, the state of that epoch is deleted and `retired_epoch` says so.
-- Any rebuild (a late record, a replay, an admin change) raises the epoch,
-- which makes the coupon a candidate again.
ALTER TABLE coupon
    ADD COLUMN retire_epoch bigint,
    ADD COLUMN retire_offset bigint,
    ADD COLUMN retired_epoch bigint;
