-- Watchlist events (`enable_watchlist_events`, `max_watchlist_size` of `AppConfig`).
-- Apply after 0001 with `sqlx migrate run --source migrations/mysql` or `mysql db <` this file.
ALTER TABLE apps ADD COLUMN enable_watchlist_events BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE apps ADD COLUMN max_watchlist_size INTEGER NOT NULL DEFAULT 100;
