//! Durable state in SQLite: offenses with their evidence, active blocks with their expiry,
//! terminations, used reconnect tickets and the append-only audit trail.
//!
//! The store is written by one owner, the decision task, through [`Store::commit`]: every
//! decision batch is a list of [`Change`]s applied in **one transaction**, committed before
//! the decision is handed to enforcement (write-ahead). On start, [`Store::open`] checks that
//! the file is an intact egressguard database, migrates its schema, and the decision task
//! rebuilds its state from [`Store::blocks`], [`Store::offense_marks_since`] and friends.
//!
//! Durability: the journal is WAL and `synchronous=FULL`. With WAL, `NORMAL` already survives
//! a killed process (`kill -9`: committed transactions sit in the WAL file, which the OS keeps),
//! but may lose the last transactions on power loss or a kernel crash, because the WAL is
//! fsynced only at checkpoints. `FULL` fsyncs the WAL at every commit, so a decision the
//! agent acted on survives a power cut too. Decisions are rare (the circuit breaker caps new
//! blocks per minute), so the fsync per batch costs nothing that matters; see
//! docs/performance.md. The database is opened with `locking_mode=EXCLUSIVE`: a second agent
//! on the same file gets a clear error instead of two writers deciding apart.
//!
//! A file that is not an egressguard database, is corrupt or cannot be read is a
//! [`StateError`] naming the file and what to do — never a silent fresh start, which would
//! forget every block and offense.

mod schema;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::messages::{BlockKind, Category, Evidence, Time};

pub use schema::APPLICATION_ID;

/// What can go wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be opened or read (permissions, a directory, a missing parent).
    #[error(
        "cannot open the state database {path}: check that it is a readable and writable file \
         and that its directory exists and is writable by the agent (the package runs it as \
         root with --state-dir /var/lib/egressguard)"
    )]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is damaged, or is not a SQLite database at all.
    #[error(
        "the state database {path} is corrupt or not a database: restore it from backup, or \
         move it aside (the agent then starts with no blocks and no offense history)"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: CorruptCause,
    },
    /// The file is a SQLite database of another program.
    #[error(
        "{path} is a SQLite database, but not egressguard's (application_id {found:#x}): \
         point --state-dir at the right directory, or move the file aside"
    )]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// The `application_id` found.
        found: i32,
    },
    /// The schema is newer than this build understands (the agent was downgraded).
    #[error(
        "the state database {path} has schema version {found}, newer than this build's \
         {supported}: run the newer egressguard, or restore a backup made by this version"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// Another process holds the database (a second agent on the same state directory).
    #[error(
        "the state database {path} is locked by another process: is another egressguard \
         running with the same --state-dir?"
    )]
    Locked {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        #[source]
        source: rusqlite::Error,
    },
    /// A statement failed while reading or writing.
    #[error("state database {path}: {what} failed")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// SQLite's reason.
        #[source]
        source: rusqlite::Error,
    },
    /// A row holds a value this build cannot read back (hand-edited or damaged).
    #[error("state database {path}: table {table} holds an unreadable value `{value}`")]
    BadValue {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The value.
        value: String,
    },
    /// Encoding or decoding a JSON column failed.
    #[error("state database {path}: JSON column of table {table}")]
    Json {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// serde_json's reason.
        #[source]
        source: serde_json::Error,
    },
}

/// The underlying reason a database was judged corrupt.
#[derive(Debug, thiserror::Error)]
pub enum CorruptCause {
    /// SQLite refused the file.
    #[error("SQLite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// `PRAGMA quick_check` found damage.
    #[error("integrity check: {0}")]
    Check(String),
}

/// One offense: a detection that took an address one rung up the ladder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OffenseRecord {
    /// The offending address or prefix.
    pub target: IpNet,
    /// When it was decided (the detection's time).
    pub time: Time,
    /// Offense number within `forget_after` (1-based).
    pub number: u32,
    /// What was detected.
    pub category: Category,
    /// The profile whose thresholds applied.
    pub profile: String,
    /// The hold it earned.
    pub kind: BlockKind,
    /// When that hold lifts by itself.
    pub expires: Option<Time>,
    /// Decided in dry-run mode (logged, not enforced).
    pub dry_run: bool,
    /// The detector's evidence.
    pub evidence: Evidence,
}

/// A flowspec "service" match kept with a block: the protocol and destination ports the
/// offence used, for `flowspec_match: service`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// IP protocol, when one.
    pub proto: Option<u8>,
    /// Destination ports.
    pub dports: Vec<u16>,
}

/// An active hold on an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// The address or prefix held.
    pub target: IpNet,
    /// How it is held.
    pub kind: BlockKind,
    /// Since when (the current hold; an escalation restarts it).
    pub since: Time,
    /// When it lifts by itself; `None` until a reconnect (or for good when terminated).
    pub expires: Option<Time>,
    /// The offense number that caused it (0 for operator blocks).
    pub offense: u32,
    /// The category detected, `None` for operator blocks.
    pub category: Option<Category>,
    /// Human-readable reason, as `list` shows it.
    pub reason: String,
    /// Who decided: `egressguard` for detections, else the operator.
    pub actor: String,
    /// Decided in dry-run mode: recorded, not enforced.
    pub dry_run: bool,
    /// Protocol and ports of the offence, for flowspec service matches.
    pub service: Service,
}

/// A termination (the last rung), kept after an override lifts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminationRecord {
    /// The terminated address or prefix.
    pub target: IpNet,
    /// When.
    pub since: Time,
    /// The offense that reached the last rung.
    pub offense: u32,
    /// Why.
    pub reason: String,
    /// When a reconnect with `override_termination` lifted it.
    pub lifted_at: Option<Time>,
    /// The ticket that lifted it.
    pub lifted_by: Option<String>,
}

/// A reconnect authorisation that was applied: its ticket is used for good.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectRecord {
    /// The ticket.
    pub ticket: String,
    /// The address let back on.
    pub target: IpNet,
    /// Who authorised it.
    pub authorised_by: String,
    /// When the agent applied it.
    pub applied_at: Time,
    /// The conditions attested.
    pub conditions: Vec<String>,
    /// Whether it lifted a termination.
    pub override_termination: bool,
}

/// One entry of the audit trail, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub time: Time,
    /// Who: `egressguard` for the agent's own decisions, the operator, or who authorised a
    /// reconnect.
    pub actor: String,
    /// What ([`actions`]).
    pub action: String,
    /// The address or prefix concerned, when one.
    pub target: Option<IpNet>,
    /// Reason, ticket or refusal text.
    pub reason: String,
    /// Decided in dry-run mode.
    pub dry_run: bool,
    /// Structured detail.
    pub detail: serde_json::Value,
}

/// One entry of the audit trail, as read back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail (increasing).
    pub id: i64,
    /// The entry.
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// The `action` names written to the audit trail.
pub mod actions {
    /// An address was quarantined, blocked or terminated after a detection.
    pub const HOLD: &str = "hold";
    /// An operator blocked an address.
    pub const OPERATOR_BLOCK: &str = "operator_block";
    /// An operator lifted a block.
    pub const OPERATOR_UNBLOCK: &str = "operator_unblock";
    /// A hold ran out.
    pub const EXPIRE: &str = "expire";
    /// A hold was restored from the database at start.
    pub const RESTORE: &str = "restore";
    /// A reconnect authorisation lifted a hold.
    pub const RECONNECT: &str = "reconnect";
    /// A reconnect authorisation was refused.
    pub const RECONNECT_REFUSED: &str = "reconnect_refused";
    /// A detection of a protected (allowlisted or infrastructure) address was ignored.
    pub const PROTECTED: &str = "protected";
    /// A hold was lifted because its target became protected (written by versions before
    /// holds were suspended instead; kept so their audit trails read).
    pub const PROTECTED_LIFT: &str = "protected_lift";
    /// A hold suspended (kept, not enforced) because its target became protected.
    pub const PROTECTED_SUSPEND: &str = "protected_suspend";
    /// A suspended hold enforced again: its target is not protected any more.
    pub const PROTECTED_RESUME: &str = "protected_resume";
    /// A block was not made because the circuit breaker is open.
    pub const SUPPRESSED: &str = "suppressed";
    /// The circuit breaker tripped.
    pub const BREAKER_TRIPPED: &str = "breaker_tripped";
    /// The wall clock stepped; every hold's expiry moved with it (remaining time kept).
    pub const CLOCK_STEP: &str = "clock_step";
    /// The circuit breaker was reset.
    pub const BREAKER_RESET: &str = "breaker_reset";
    /// A tripped circuit breaker re-armed by itself after its cool-down.
    pub const BREAKER_REARMED: &str = "breaker_rearmed";
    /// Dry-run holds were discarded when the policy switched to enforce.
    pub const DRY_RUN_DISCARDED: &str = "dry_run_discarded";
    /// The agent started with `run --fresh-state` on an empty database while the kernel
    /// still held addresses: the operator chose to drop them.
    pub const FRESH_STATE: &str = "fresh_state";
}

/// One change to the database; a decision batch is a list of them, applied in one
/// transaction by [`Store::commit`].
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Record an offense with its evidence.
    Offense(Box<OffenseRecord>),
    /// Insert or replace the hold on a target.
    PutBlock(BlockRecord),
    /// Remove the hold on a target (no-op when none).
    RemoveBlock(IpNet),
    /// Record a termination.
    Terminate(TerminationRecord),
    /// Mark a termination lifted by an override.
    LiftTermination {
        /// The target.
        target: IpNet,
        /// When.
        time: Time,
        /// The ticket.
        ticket: String,
    },
    /// Record a used reconnect ticket.
    Reconnect(ReconnectRecord),
    /// Remember when a ticket was first seen in the policy (kept once).
    TicketSeen {
        /// The ticket.
        ticket: String,
        /// Its address.
        target: IpNet,
        /// When first seen.
        time: Time,
    },
    /// Append to the audit trail.
    Audit(AuditEntry),
}

/// The state database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn t2i(t: Time) -> i64 {
    i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)
}

fn i2t(i: i64) -> Time {
    Time(u64::try_from(i).unwrap_or(0))
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn is_cant_open(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::CannotOpen)
            | Some(rusqlite::ErrorCode::PermissionDenied)
            | Some(rusqlite::ErrorCode::ReadOnly)
            | Some(rusqlite::ErrorCode::SystemIoFailure)
    )
}

impl Store {
    /// Opens (or creates) the database at `path`, checks it, and migrates its schema.
    ///
    /// A missing file is created empty; an existing one must be an intact egressguard
    /// database, else a [`StateError`] that names the file and what to do.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            tracing::warn!(path = %path.display(), "state database exists but is empty: starting with no blocks and no offense history");
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|source| StateError::Open {
            path: path.to_owned(),
            source,
        })?;
        Store::init(conn, path.to_owned())
    }

    /// A store in memory, for tests and benchmarks: same schema, nothing durable.
    pub fn open_in_memory() -> Result<Store, StateError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StateError::Open {
            path: path.clone(),
            source,
        })?;
        Store::init(conn, path)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn classify(&self, what: &'static str, e: rusqlite::Error) -> StateError {
        self_classify(&self.path, what, e)
    }

    fn init(conn: Connection, path: PathBuf) -> Result<Store, StateError> {
        let mut store = Store { conn, path };
        store
            .conn
            .busy_timeout(std::time::Duration::from_millis(200))
            .map_err(|e| store.classify("setting the busy timeout", e))?;
        // The first statement reads the header: garbage bytes fail here (SQLITE_NOTADB).
        let app_id: i32 = store
            .conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| store.classify("reading the header", e))?;
        let user_version: i32 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| store.classify("reading the schema version", e))?;
        let tables: i64 = store
            .conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(|e| store.classify("reading the schema", e))?;
        if app_id != APPLICATION_ID && (app_id != 0 || tables != 0) {
            return Err(StateError::Foreign {
                path: store.path.clone(),
                found: app_id,
            });
        }
        let supported = schema::current_version();
        let found = u32::try_from(user_version).unwrap_or(u32::MAX);
        if found > supported {
            return Err(StateError::TooNew {
                path: store.path.clone(),
                found,
                supported,
            });
        }
        // WAL + FULL: see the module documentation. EXCLUSIVE: one agent per database.
        for pragma in [
            "PRAGMA locking_mode = EXCLUSIVE",
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = FULL",
        ] {
            store
                .conn
                .query_row(pragma, [], |_| Ok(()))
                .optional()
                .map_err(|e| store.classify("setting the journal mode", e))?;
        }
        if tables != 0 {
            let check: String = store
                .conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| store.classify("checking integrity", e))?;
            if check != "ok" {
                return Err(StateError::Corrupt {
                    path: store.path.clone(),
                    source: CorruptCause::Check(check),
                });
            }
        }
        store.migrate(found)?;
        Ok(store)
    }

    fn migrate(&mut self, from: u32) -> Result<(), StateError> {
        let to = schema::current_version();
        if from == to {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction()
            .map_err(|e| self_classify(&self.path, "starting the migration", e))?;
        if from == 0 {
            tx.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at INTEGER NOT NULL);",
            )
            .map_err(|e| self_classify(&self.path, "creating schema_version", e))?;
        }
        for v in from..to {
            tx.execute_batch(schema::MIGRATIONS[v as usize])
                .map_err(|e| self_classify(&self.path, "migrating the schema", e))?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                params![v + 1, t2i(Time::now())],
            )
            .map_err(|e| self_classify(&self.path, "recording the schema version", e))?;
        }
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {to};"
        ))
        .map_err(|e| self_classify(&self.path, "stamping the schema version", e))?;
        tx.commit()
            .map_err(|e| self_classify(&self.path, "committing the migration", e))
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StateError> {
        let v: i32 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.classify("reading the schema version", e))?;
        Ok(u32::try_from(v).unwrap_or(0))
    }

    /// Applies a decision batch in one transaction: all of it is durable, or none of it.
    pub fn commit(&mut self, changes: &[Change]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| self_classify(&path, "starting a transaction", e))?;
        for c in changes {
            apply(&tx, &path, c)?;
        }
        tx.commit()
            .map_err(|e| self_classify(&path, "committing a decision batch", e))
    }

    /// Every hold recorded, expired or not.
    pub fn blocks(&self) -> Result<Vec<BlockRecord>, StateError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, kind, since, expires, offense, category, reason, actor, dry_run, service
                 FROM blocks ORDER BY target",
            )
            .map_err(|e| self.classify("reading blocks", e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, bool>(8)?,
                    r.get::<_, String>(9)?,
                ))
            })
            .map_err(|e| self.classify("reading blocks", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (target, kind, since, expires, offense, category, reason, actor, dry_run, service) =
                row.map_err(|e| self.classify("reading blocks", e))?;
            out.push(BlockRecord {
                target: self.net(&target, "blocks")?,
                kind: self.enum_of(&kind, "blocks")?,
                since: i2t(since),
                expires: expires.map(i2t),
                offense: u32::try_from(offense).unwrap_or(0),
                category: category.map(|c| self.enum_of(&c, "blocks")).transpose()?,
                reason,
                actor,
                dry_run,
                service: self.json(&service, "blocks")?,
            });
        }
        Ok(out)
    }

    /// The holds that still apply at `now`: no expiry, or an expiry after `now`. What the
    /// agent restores on start (after a `kill -9` or a reboot that emptied the nft table).
    pub fn active_blocks(&self, now: Time) -> Result<Vec<BlockRecord>, StateError> {
        Ok(self
            .blocks()?
            .into_iter()
            .filter(|b| b.expires.is_none_or(|e| e > now))
            .collect())
    }

    /// `(target, time, dry_run)` of every offense at or after `since`: what the ladder counts.
    pub fn offense_marks_since(&self, since: Time) -> Result<Vec<(IpNet, Time, bool)>, StateError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, time, dry_run FROM offenses WHERE time >= ?1 ORDER BY time, id",
            )
            .map_err(|e| self.classify("reading offenses", e))?;
        let rows = st
            .query_map([t2i(since)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(|e| self.classify("reading offenses", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (t, time, dry) = row.map_err(|e| self.classify("reading offenses", e))?;
            out.push((self.net(&t, "offenses")?, i2t(time), dry));
        }
        Ok(out)
    }

    /// Every offense of `target` with its evidence, oldest first (for `show ADDR`).
    pub fn offenses(&self, target: IpNet) -> Result<Vec<OffenseRecord>, StateError> {
        self.offenses_page(target, None, 0)
    }

    /// The offenses of `target`, oldest first, of one page: at most `limit` (all when
    /// `None`) after skipping the `offset` newest.
    pub fn offenses_page(
        &self,
        target: IpNet,
        limit: Option<usize>,
        offset: usize,
    ) -> Result<Vec<OffenseRecord>, StateError> {
        // SQLite: a negative LIMIT is no limit.
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT time, number, category, profile, kind, expires, dry_run, evidence FROM
                 (SELECT id, time, number, category, profile, kind, expires, dry_run, evidence
                  FROM offenses WHERE target = ?1 ORDER BY time DESC, id DESC LIMIT ?2 OFFSET ?3)
                 ORDER BY time, id",
            )
            .map_err(|e| self.classify("reading offenses", e))?;
        let rows = st
            .query_map(params![target.to_string(), limit, offset], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })
            .map_err(|e| self.classify("reading offenses", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (time, number, category, profile, kind, expires, dry_run, evidence) =
                row.map_err(|e| self.classify("reading offenses", e))?;
            out.push(OffenseRecord {
                target,
                time: i2t(time),
                number: u32::try_from(number).unwrap_or(0),
                category: self.enum_of(&category, "offenses")?,
                profile,
                kind: self.enum_of(&kind, "offenses")?,
                expires: expires.map(i2t),
                dry_run,
                evidence: self.json(&evidence, "offenses")?,
            });
        }
        Ok(out)
    }

    /// Number of offenses recorded for `target`.
    pub fn offense_count_of(&self, target: IpNet) -> Result<u64, StateError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM offenses WHERE target = ?1",
                [target.to_string()],
                |r| r.get(0),
            )
            .map_err(|e| self.classify("counting offenses", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Number of audit entries about `target`.
    pub fn audit_count_of(&self, target: IpNet) -> Result<u64, StateError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM audit WHERE target = ?1",
                [target.to_string()],
                |r| r.get(0),
            )
            .map_err(|e| self.classify("counting audit entries", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Number of offenses recorded (all addresses, all time).
    pub fn offense_count(&self) -> Result<u64, StateError> {
        self.count("SELECT count(*) FROM offenses")
    }

    /// Every termination, lifted or not.
    pub fn terminations(&self) -> Result<Vec<TerminationRecord>, StateError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, since, offense, reason, lifted_at, lifted_by FROM terminations ORDER BY target",
            )
            .map_err(|e| self.classify("reading terminations", e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(|e| self.classify("reading terminations", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (target, since, offense, reason, lifted_at, lifted_by) =
                row.map_err(|e| self.classify("reading terminations", e))?;
            out.push(TerminationRecord {
                target: self.net(&target, "terminations")?,
                since: i2t(since),
                offense: u32::try_from(offense).unwrap_or(0),
                reason,
                lifted_at: lifted_at.map(i2t),
                lifted_by,
            });
        }
        Ok(out)
    }

    /// Every used reconnect ticket.
    pub fn reconnects(&self) -> Result<Vec<ReconnectRecord>, StateError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT ticket, target, authorised_by, applied_at, conditions, override_termination
                 FROM reconnects ORDER BY applied_at, ticket",
            )
            .map_err(|e| self.classify("reading reconnects", e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            })
            .map_err(|e| self.classify("reading reconnects", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (ticket, target, authorised_by, applied_at, conditions, ovr) =
                row.map_err(|e| self.classify("reading reconnects", e))?;
            out.push(ReconnectRecord {
                ticket,
                target: self.net(&target, "reconnects")?,
                authorised_by,
                applied_at: i2t(applied_at),
                conditions: self.json(&conditions, "reconnects")?,
                override_termination: ovr,
            });
        }
        Ok(out)
    }

    /// The latest time the records hold (audit entries, holds, first sightings of tickets):
    /// the agent's high-water time across restarts.
    pub fn latest_time(&self) -> Result<Option<Time>, StateError> {
        let t: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(t) FROM (SELECT MAX(time) AS t FROM audit \
                 UNION ALL SELECT MAX(since) FROM blocks \
                 UNION ALL SELECT MAX(first_seen) FROM tickets_seen)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.classify("reading the latest time", e))?;
        Ok(t.map(i2t))
    }

    /// `(ticket, first seen)` of every ticket ever read from a policy.
    pub fn tickets_seen(&self) -> Result<Vec<(String, Time)>, StateError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT ticket, first_seen FROM tickets_seen")
            .map_err(|e| self.classify("reading tickets", e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.classify("reading tickets", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (t, s) = row.map_err(|e| self.classify("reading tickets", e))?;
            out.push((t, i2t(s)));
        }
        Ok(out)
    }

    /// The audit trail, oldest first: all of it, or only the entries about `target`; at most
    /// the last `limit` entries.
    pub fn audit(
        &self,
        target: Option<IpNet>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StateError> {
        self.audit_page(target, limit, 0)
    }

    /// Like [`Store::audit`], after skipping the `offset` newest entries.
    pub fn audit_page(
        &self,
        target: Option<IpNet>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<AuditRecord>, StateError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let sql = if target.is_some() {
            "SELECT id, time, actor, action, target, reason, dry_run, detail FROM audit
             WHERE target = ?1 ORDER BY id DESC LIMIT ?2 OFFSET ?3"
        } else {
            "SELECT id, time, actor, action, target, reason, dry_run, detail FROM audit
             WHERE ?1 IS NULL ORDER BY id DESC LIMIT ?2 OFFSET ?3"
        };
        let mut st = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| self.classify("reading the audit trail", e))?;
        let rows = st
            .query_map(params![target.map(|t| t.to_string()), limit, offset], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })
            .map_err(|e| self.classify("reading the audit trail", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, time, actor, action, target, reason, dry_run, detail) =
                row.map_err(|e| self.classify("reading the audit trail", e))?;
            out.push(AuditRecord {
                id,
                entry: AuditEntry {
                    time: i2t(time),
                    actor,
                    action,
                    target: target.map(|t| self.net(&t, "audit")).transpose()?,
                    reason,
                    dry_run,
                    detail: self.json(&detail, "audit")?,
                },
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Number of audit entries.
    pub fn audit_len(&self) -> Result<u64, StateError> {
        self.count("SELECT count(*) FROM audit")
    }

    /// Runs raw SQL; lets unit tests of other modules inject failures.
    #[cfg(test)]
    pub(crate) fn execute_batch_for_test(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.execute_batch(sql)
    }

    fn count(&self, sql: &str) -> Result<u64, StateError> {
        let n: i64 = self
            .conn
            .query_row(sql, [], |r| r.get(0))
            .map_err(|e| self.classify("counting", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn net(&self, s: &str, table: &'static str) -> Result<IpNet, StateError> {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| StateError::BadValue {
                path: self.path.clone(),
                table,
                value: s.to_owned(),
            })
    }

    fn enum_of<T: serde::de::DeserializeOwned>(
        &self,
        s: &str,
        table: &'static str,
    ) -> Result<T, StateError> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            StateError::BadValue {
                path: self.path.clone(),
                table,
                value: s.to_owned(),
            }
        })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        s: &str,
        table: &'static str,
    ) -> Result<T, StateError> {
        serde_json::from_str(s).map_err(|source| StateError::Json {
            path: self.path.clone(),
            table,
            source,
        })
    }
}

fn self_classify(path: &Path, what: &'static str, e: rusqlite::Error) -> StateError {
    let path = path.to_owned();
    if is_corruption(&e) {
        StateError::Corrupt {
            path,
            source: CorruptCause::Sqlite(e),
        }
    } else if is_busy(&e) {
        StateError::Locked { path, source: e }
    } else if is_cant_open(&e) {
        StateError::Open { path, source: e }
    } else {
        StateError::Sql {
            path,
            what,
            source: e,
        }
    }
}

fn to_json<T: Serialize>(path: &Path, table: &'static str, v: &T) -> Result<String, StateError> {
    serde_json::to_string(v).map_err(|source| StateError::Json {
        path: path.to_owned(),
        table,
        source,
    })
}

fn apply(tx: &rusqlite::Transaction<'_>, path: &Path, c: &Change) -> Result<(), StateError> {
    let sql_err = |what: &'static str| move |e| self_classify(path, what, e);
    match c {
        Change::Offense(o) => {
            let evidence = to_json(path, "offenses", &o.evidence)?;
            tx.prepare_cached(
                "INSERT INTO offenses (target, time, number, category, profile, kind, expires, dry_run, evidence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    o.target.to_string(),
                    t2i(o.time),
                    o.number,
                    o.category.as_str(),
                    o.profile,
                    o.kind.as_str(),
                    o.expires.map(t2i),
                    o.dry_run,
                    evidence
                ])
            })
            .map_err(sql_err("recording an offense"))?;
        }
        Change::PutBlock(b) => {
            let service = to_json(path, "blocks", &b.service)?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO blocks
                 (target, kind, since, expires, offense, category, reason, actor, dry_run, service)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    b.target.to_string(),
                    b.kind.as_str(),
                    t2i(b.since),
                    b.expires.map(t2i),
                    b.offense,
                    b.category.map(|c| c.as_str()),
                    b.reason,
                    b.actor,
                    b.dry_run,
                    service
                ])
            })
            .map_err(sql_err("recording a block"))?;
        }
        Change::RemoveBlock(t) => {
            tx.prepare_cached("DELETE FROM blocks WHERE target = ?1")
                .and_then(|mut st| st.execute([t.to_string()]))
                .map_err(sql_err("removing a block"))?;
        }
        Change::Terminate(t) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO terminations (target, since, offense, reason, lifted_at, lifted_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    t.target.to_string(),
                    t2i(t.since),
                    t.offense,
                    t.reason,
                    t.lifted_at.map(t2i),
                    t.lifted_by
                ])
            })
            .map_err(sql_err("recording a termination"))?;
        }
        Change::LiftTermination {
            target,
            time,
            ticket,
        } => {
            tx.prepare_cached(
                "UPDATE terminations SET lifted_at = ?2, lifted_by = ?3 WHERE target = ?1",
            )
            .and_then(|mut st| st.execute(params![target.to_string(), t2i(*time), ticket]))
            .map_err(sql_err("lifting a termination"))?;
        }
        Change::Reconnect(r) => {
            let conditions = to_json(path, "reconnects", &r.conditions)?;
            tx.prepare_cached(
                "INSERT INTO reconnects (ticket, target, authorised_by, applied_at, conditions, override_termination)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.ticket,
                    r.target.to_string(),
                    r.authorised_by,
                    t2i(r.applied_at),
                    conditions,
                    r.override_termination
                ])
            })
            .map_err(sql_err("recording a reconnect"))?;
        }
        Change::TicketSeen {
            ticket,
            target,
            time,
        } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO tickets_seen (ticket, target, first_seen) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| st.execute(params![ticket, target.to_string(), t2i(*time)]))
            .map_err(sql_err("recording a ticket"))?;
        }
        Change::Audit(a) => {
            let detail = to_json(path, "audit", &a.detail)?;
            tx.prepare_cached(
                "INSERT INTO audit (time, actor, action, target, reason, dry_run, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    t2i(a.time),
                    a.actor,
                    a.action,
                    a.target.map(|t| t.to_string()),
                    a.reason,
                    a.dry_run,
                    detail
                ])
            })
            .map_err(sql_err("appending to the audit trail"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
