-- Watchlist events (`enable_watchlist_events`, `max_watchlist_size` of `AppConfig`).
-- Apply after 0001 with `sqlx migrate run --source migrations/postgres` or `psql -f`.
ALTER TABLE apps ADD COLUMN IF NOT EXISTS enable_watchlist_events BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE apps ADD COLUMN IF NOT EXISTS max_watchlist_size INTEGER NOT NULL DEFAULT 100;
