//! The state database's schema and its migrations.
//!
//! Each entry of [`MIGRATIONS`] moves the schema one version up; `schema_version` records
//! every version applied and when. A database written by a newer build (a version this build
//! does not know) is refused rather than guessed at. The audit table is append-only: triggers
//! abort any `UPDATE` or `DELETE` on it.

/// SQLite `application_id` of an egressguard state database ("EGRD"), so that another
/// program's SQLite file is recognised as not ours.
pub const APPLICATION_ID: i32 = 0x4547_5244;

/// The schema, one SQL batch per version; index 0 creates version 1.
pub const MIGRATIONS: &[&str] = &[
    // Version 1.
    r#"
CREATE TABLE offenses (
    id        INTEGER PRIMARY KEY,
    target    TEXT    NOT NULL,
    time      INTEGER NOT NULL,
    number    INTEGER NOT NULL,
    category  TEXT    NOT NULL,
    profile   TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    expires   INTEGER,
    dry_run   INTEGER NOT NULL,
    evidence  TEXT    NOT NULL
);
CREATE INDEX offenses_by_target ON offenses (target, time);
CREATE INDEX offenses_by_time ON offenses (time);

CREATE TABLE blocks (
    target    TEXT    PRIMARY KEY,
    kind      TEXT    NOT NULL,
    since     INTEGER NOT NULL,
    expires   INTEGER,
    offense   INTEGER NOT NULL,
    category  TEXT,
    reason    TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    dry_run   INTEGER NOT NULL,
    service   TEXT    NOT NULL
);

CREATE TABLE terminations (
    target     TEXT    PRIMARY KEY,
    since      INTEGER NOT NULL,
    offense    INTEGER NOT NULL,
    reason     TEXT    NOT NULL,
    lifted_at  INTEGER,
    lifted_by  TEXT
);

CREATE TABLE reconnects (
    ticket                TEXT    PRIMARY KEY,
    target                TEXT    NOT NULL,
    authorised_by         TEXT    NOT NULL,
    applied_at            INTEGER NOT NULL,
    conditions            TEXT    NOT NULL,
    override_termination  INTEGER NOT NULL
);

CREATE TABLE tickets_seen (
    ticket      TEXT    PRIMARY KEY,
    target      TEXT    NOT NULL,
    first_seen  INTEGER NOT NULL
);

CREATE TABLE audit (
    id       INTEGER PRIMARY KEY,
    time     INTEGER NOT NULL,
    actor    TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    target   TEXT,
    reason   TEXT    NOT NULL,
    dry_run  INTEGER NOT NULL,
    detail   TEXT    NOT NULL
);
CREATE INDEX audit_by_target ON audit (target, id);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"#,
];

/// The schema version this build writes.
pub fn current_version() -> u32 {
    MIGRATIONS.len() as u32
}
