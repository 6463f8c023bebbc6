-- The web dashboard's sign-ins (broker/web): one-time login tokens that
-- `operators login --browser` obtains over the admin API, and the browser sessions they become.
-- Both are stored by the SHA-256 of their secret only, with the identity of the operator's
-- certificate, so every broker of a shared store accepts them and re-authorises the operator.
CREATE TABLE dashboard_logins (
    id TEXT PRIMARY KEY,                -- SHA-256 (hex) of the token
    operator TEXT NOT NULL,
    vault TEXT NOT NULL,
    role TEXT NOT NULL,
    site TEXT NOT NULL DEFAULT '',
    cert_serial TEXT NOT NULL,          -- hex
    cert_not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL                        -- set once: a token signs in one browser, once
);
CREATE INDEX dashboard_logins_by_expiry ON dashboard_logins (expires_at);
CREATE TABLE dashboard_sessions (
    id TEXT PRIMARY KEY,                -- SHA-256 (hex) of the session cookie
    operator TEXT NOT NULL,
    vault TEXT NOT NULL,
    role TEXT NOT NULL,
    site TEXT NOT NULL DEFAULT '',
    cert_serial TEXT NOT NULL,
    cert_not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX dashboard_sessions_by_expiry ON dashboard_sessions (expires_at);
