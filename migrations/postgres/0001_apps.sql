-- Apps (tenants) for `app_manager.driver = "postgres"`. The columns mirror `AppConfig` in
-- src/config/mod.rs and default to its defaults; sockudo also reads NULL as the default.
-- Apply with `sqlx migrate run --source migrations/postgres` or `psql -f` this file.
CREATE TABLE IF NOT EXISTS apps (
    id                               VARCHAR(64)  PRIMARY KEY,
    key                              VARCHAR(255) NOT NULL,
    secret                           VARCHAR(255) NOT NULL,
    enabled                          BOOLEAN      NOT NULL DEFAULT TRUE,
    -- Connections per node; 0 means no limit.
    max_connections                  BIGINT       NOT NULL DEFAULT 0,
    enable_client_messages           BOOLEAN      NOT NULL DEFAULT FALSE,
    enable_user_authentication       BOOLEAN      NOT NULL DEFAULT FALSE,
    enable_subscription_count        BOOLEAN      NOT NULL DEFAULT FALSE,
    max_client_events_per_second     INTEGER      NOT NULL DEFAULT 100,
    max_presence_members_per_channel INTEGER      NOT NULL DEFAULT 100,
    max_presence_member_size_in_kb   INTEGER      NOT NULL DEFAULT 2,
    max_channel_name_length          INTEGER      NOT NULL DEFAULT 200,
    max_event_name_length            INTEGER      NOT NULL DEFAULT 200,
    max_event_payload_in_kb          INTEGER      NOT NULL DEFAULT 100,
    max_event_channels_at_once       INTEGER      NOT NULL DEFAULT 100,
    max_event_batch_size             INTEGER      NOT NULL DEFAULT 10,
    user_authentication_timeout      INTEGER      NOT NULL DEFAULT 0,
    max_backend_events_per_second    INTEGER      NOT NULL DEFAULT 0,
    max_read_requests_per_second     INTEGER      NOT NULL DEFAULT 0,
    -- A JSON array of strings, e.g. ["https://app.example.com", "*.example.com"].
    allowed_origins                  JSONB        NOT NULL DEFAULT '[]',
    -- A JSON array of {"url": ..., "event_types": [...], "headers": {...}}.
    webhooks                         JSONB        NOT NULL DEFAULT '[]',
    created_at                       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at                       TIMESTAMPTZ  NOT NULL DEFAULT now()
);

-- Clients connect by key: one app per key, and the lookup is an index scan.
CREATE UNIQUE INDEX IF NOT EXISTS apps_key ON apps (key);
