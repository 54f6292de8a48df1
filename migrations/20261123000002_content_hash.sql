-- A hash of each record's content (record id, stream, ts, payload), so a
-- redelivered key with different content is refused instead of silently
-- keeping whichever version arrived first. Nullable and without a default, so
-- adding it rewrites nothing; rows stored before it are not compared.
ALTER TABLE records ADD COLUMN content_hash bigint;
