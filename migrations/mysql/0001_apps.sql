-- Apps (tenants) for `app_manager.driver = "mysql"` (MySQL 5.7+ and MariaDB 10.2+). The columns
-- mirror `AppConfig` in src/config/mod.rs and default to its defaults; sockudo also reads NULL
-- as the default. Ids, keys and secrets compare case-sensitively (utf8mb4_bin).
-- Apply with `sqlx migrate run --source migrations/mysql` or `mysql db < ` this file.
CREATE TABLE IF NOT EXISTS apps (
    id                               VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `key`                            VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    secret                           VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    enabled                          BOOLEAN      NOT NULL DEFAULT TRUE,
    -- Connections per node; 0 means no limit.
    max_connections                  BIGINT UNSIGNED NOT NULL DEFAULT 0,
    enable_client_messages           BOOLEAN      NOT NULL DEFAULT FALSE,
    enable_user_authentication       BOOLEAN      NOT NULL DEFAULT FALSE,
    enable_subscription_count        BOOLEAN      NOT NULL DEFAULT FALSE,
    max_client_events_per_second     INT UNSIGNED NOT NULL DEFAULT 100,
    max_presence_members_per_channel INT UNSIGNED NOT NULL DEFAULT 100,
    max_presence_member_size_in_kb   INT UNSIGNED NOT NULL DEFAULT 2,
    max_channel_name_length          INT UNSIGNED NOT NULL DEFAULT 200,
    max_event_name_length            INT UNSIGNED NOT NULL DEFAULT 200,
    max_event_payload_in_kb          INT UNSIGNED NOT NULL DEFAULT 100,
    max_event_channels_at_once       INT UNSIGNED NOT NULL DEFAULT 100,
    max_event_batch_size             INT UNSIGNED NOT NULL DEFAULT 10,
    user_authentication_timeout      INT UNSIGNED NOT NULL DEFAULT 0,
    max_backend_events_per_second    INT UNSIGNED NOT NULL DEFAULT 0,
    max_read_requests_per_second     INT UNSIGNED NOT NULL DEFAULT 0,
    -- A JSON array of strings, e.g. ["https://app.example.com", "*.example.com"]; NULL is [].
    allowed_origins                  JSON         NULL,
    -- A JSON array of {"url": ..., "event_types": [...], "headers": {...}}; NULL is [].
    webhooks                         JSON         NULL,
    created_at                       TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at                       TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    -- Clients connect by key: one app per key, and the lookup is an index lookup.
    UNIQUE KEY apps_key (`key`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
