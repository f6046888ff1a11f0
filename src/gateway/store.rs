//! The gateway's status store: every task, workflow run and idempotency
//! key the gateway has read from the topics, on local disk, with the
//! offsets applied so far. The in-memory [`View`](super::view::View) is its
//! hot part (live tasks, their events, long-poll waiters, bounded); this is
//! what keeps results for days and answers the list queries.
//!
//! SQLite (bundled, through `rusqlite`), for three reasons:
//! - **queries**: the list routes filter on type, status, key and time and
//!   page newest first; SQLite's composite indexes serve each filter in
//!   index order and stop at the page's end, so a page costs the same at
//!   10 million rows as at 10 thousand (a key-value store would need these
//!   indexes written and kept by hand);
//! - **crash safety**: rows and the offsets they came from are written in
//!   one transaction (write-ahead log, `synchronous = NORMAL`): a process
//!   killed mid-write leaves the last committed transaction, never rows
//!   without their offsets or offsets past their rows (a power loss may
//!   also lose the last few transactions, which the topics then replay);
//! - **build**: one C file, ~2 minutes once on two cores, no system
//!   library.
//!
//! One writer (the follower's thread, batching many records per
//! transaction) and a small pool of readers (the HTTP handlers), which the
//! write-ahead log lets read while the writer writes. Its memory is bounded
//! whatever the file's size: 2 MiB of page cache per connection and 16 MiB
//! of SQLite heap in all (`soft_heap_limit`); temporary tables in memory,
//! so a read-only root file system needs no writable `/tmp`. Bounded by age
//! (`gateway.retention_ms`, from a task's latest record) and by disk
//! (`gateway.store_max_bytes`), the oldest going first either way;
//! outputs above `gateway.store_max_output_bytes` are kept cut, marked
//! with their full size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use uuid::Uuid;

use super::view::{Attempt, Phase, TaskView};
use crate::codec::{TaskError, WorkflowRef};

/// The store's bounds.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// How long a task is kept after its latest record, in ms.
    pub retention_ms: i64,
    /// Most bytes of pages in use before the oldest tasks are removed.
    pub max_bytes: u64,
    /// Longest output kept whole; longer ones are cut to it.
    pub max_output_bytes: usize,
    /// How long an idempotency key maps to its task, in ms.
    pub idempotency_window_ms: i64,
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the status store at {path}: {what}: {source}")]
pub struct StoreError {
    path: String,
    what: String,
    #[source]
    source: rusqlite::Error,
}

/// Most read connections kept open between requests.
const POOLED_READERS: usize = 8;
/// Most operations a write batch holds before it is written.
pub const MAX_PENDING: usize = 4_000;
/// Most tasks removed per statement when over a bound.
const REMOVE_CHUNK: i64 = 2_000;
/// Most removal statements per housekeeping pass (the next pass goes on).
const REMOVE_ROUNDS: usize = 25;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    submitted_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER,
    output BLOB,
    output_size INTEGER,
    content_type TEXT,
    error_kind TEXT,
    error_message TEXT,
    traceparent TEXT,
    run_id BLOB,
    run_name TEXT,
    step INTEGER,
    child_index INTEGER,
    child_count INTEGER,
    run_at INTEGER,
    started_at INTEGER,
    attempt INTEGER,
    worker TEXT,
    progress BLOB,
    progress_at INTEGER,
    idem_key TEXT
);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at, seq);
CREATE INDEX IF NOT EXISTS tasks_type ON tasks(type, created_at, seq);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, created_at, seq);
CREATE INDEX IF NOT EXISTS tasks_type_status ON tasks(type, status, created_at, seq);
CREATE INDEX IF NOT EXISTS tasks_key ON tasks(idem_key, created_at, seq) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_updated ON tasks(updated_at);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at, seq);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name, created_at, seq);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_at, seq);
CREATE INDEX IF NOT EXISTS runs_name_status ON runs(name, status, created_at, seq);
CREATE INDEX IF NOT EXISTS runs_updated ON runs(updated_at);
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY,
    id BLOB NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_at ON keys(at);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
";

/// The columns a task is read back with, in [`task_of`]'s order.
const TASK_COLUMNS: &str = "id, type, status, submitted_at, finished_at, attempts, output, \
    output_size, content_type, error_kind, error_message, traceparent, run_id, run_name, step, \
    child_index, child_count, run_at, started_at, attempt, worker, progress, progress_at, \
    created_at, seq, payload, payload_size";

/// The status store: its file and its readers. The writer is a
/// [`Writer`], owned by the follower's thread.
pub struct Store {
    path: PathBuf,
    /// Made for this process (no `gateway.store_path`): removed when the
    /// store is dropped.
    temporary: bool,
    readers: Mutex<Vec<Connection>>,
    limits: StoreLimits,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.temporary {
            self.readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            for suffix in ["", "-wal", "-shm"] {
                let mut name = self.path.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
        }
    }
}

fn failed(path: &Path, what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.display().to_string();
    let what = what.to_owned();
    move |source| StoreError { path, what, source }
}

/// A page of a list query, newest first.
#[derive(Debug)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts, when there may be one.
    pub next: Option<Cursor>,
}

/// Where a page starts: below this (time, sequence) in the newest-first
/// order. Clients pass `next_cursor` back as given (`cursor=`); its form,
/// `<time>.<sequence>` of at most 18 digits each, is in the OpenAPI
/// document, so any text of that form is a place in the order and
/// anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    at: i64,
    seq: i64,
}

impl Cursor {
    /// The text clients send back.
    pub fn encode(self) -> String {
        format!("{}.{}", self.at, self.seq)
    }

    /// Reads a cursor sent back; `None` when it is not of the form.
    pub fn decode(text: &str) -> Option<Cursor> {
        let (at, seq) = text.split_once('.')?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 18 && t.bytes().all(|b| b.is_ascii_digit());
        let at_digits = at.strip_prefix('-').unwrap_or(at);
        if !digits(at_digits) || !digits(seq) {
            return None;
        }
        Some(Cursor {
            at: at.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// A list query's filters.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// A task type, or a workflow name.
    pub name: Option<String>,
    /// A status name.
    pub status: Option<String>,
    /// An idempotency key (tasks only).
    pub key: Option<String>,
    /// Created at or after (ms since the epoch).
    pub since: Option<i64>,
    /// Created before (ms since the epoch).
    pub until: Option<i64>,
    /// Most items.
    pub limit: usize,
    /// Below this place.
    pub cursor: Option<Cursor>,
}

/// A workflow run, as the runs list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// The run's id.
    pub id: Uuid,
    /// The workflow's name.
    pub name: String,
    /// Its status (as `GET /v1/workflows/{id}` names it).
    pub status: String,
    /// When it was first seen (ms since the epoch).
    pub created_at: i64,
    /// When it ended.
    pub finished_at: Option<i64>,
}

/// What the store holds, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Bytes of pages in use.
    pub used_bytes: u64,
    /// Bytes of its files on disk (database and write-ahead log).
    pub file_bytes: u64,
}

/// Tasks removed by a housekeeping pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Older than the retention.
    pub expired: u64,
    /// The oldest, removed to keep within the disk budget.
    pub over_budget: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `path`, or a temporary one
    /// when `path` is empty, with its writer.
    pub fn open(path: &str, limits: StoreLimits) -> Result<(Arc<Store>, Writer), StoreError> {
        let (path, temporary) = if path.is_empty() {
            let name = format!("conveyor-gateway-{}.db", Uuid::new_v4().simple());
            (std::env::temp_dir().join(name), true)
        } else {
            (PathBuf::from(path), false)
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(e) = std::fs::create_dir_all(parent) {
                return Err(StoreError {
                    path: path.display().to_string(),
                    what: format!("creating its directory ({e})"),
                    source: rusqlite::Error::InvalidPath(parent.to_owned()),
                });
            }
        }
        let conn = Connection::open(&path).map_err(failed(&path, "opening"))?;
        // auto_vacuum must be set before the first table exists; on an
        // existing file it is a no-op.
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -2048;
             PRAGMA soft_heap_limit = 16777216;
             PRAGMA temp_store = MEMORY;",
        )
        .map_err(failed(&path, "setting it up"))?;
        conn.execute_batch(SCHEMA)
            .map_err(failed(&path, "creating its tables"))?;
        // Columns added after the first release of the store: a store
        // made by an older gateway gets them (empty) here.
        for (column, kind) in [("payload", "BLOB"), ("payload_size", "INTEGER")] {
            let present: bool = conn
                .query_row(
                    "SELECT count(*) FROM pragma_table_info('tasks') WHERE name = ?1",
                    [column],
                    |row| row.get::<_, i64>(0),
                )
                .map(|n| n > 0)
                .map_err(failed(&path, "reading its columns"))?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE tasks ADD COLUMN {column} {kind}"))
                    .map_err(failed(&path, "adding a column"))?;
            }
        }
        let store = Arc::new(Store {
            path: path.clone(),
            temporary,
            readers: Mutex::new(Vec::new()),
            limits,
        });
        let writer = Writer {
            conn,
            path,
            limits,
            pending: Vec::new(),
            offsets: HashMap::new(),
            since: Instant::now(),
        };
        Ok((store, writer))
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `read` on a pooled read connection.
    fn read<T>(
        &self,
        what: &str,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(failed(&self.path, "opening a reader"))?;
                conn.execute_batch(
                    "PRAGMA busy_timeout = 5000; PRAGMA cache_size = -2048; PRAGMA temp_store = MEMORY;",
                )
                    .map_err(failed(&self.path, "setting up a reader"))?;
                conn
            }
        };
        let outcome = read(&conn).map_err(failed(&self.path, what));
        let mut pool = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOLED_READERS {
            pool.push(conn);
        }
        outcome
    }

    /// The offsets applied so far: (topic, partition) → the next to read.
    pub fn offsets(&self) -> Result<HashMap<(String, i32), i64>, StoreError> {
        self.read("reading its offsets", |conn| {
            let mut statement = conn.prepare("SELECT topic, partition, next FROM offsets")?;
            let rows = statement.query_map([], |row| {
                Ok((
                    (row.get::<_, String>(0)?, row.get::<_, i32>(1)?),
                    row.get(2)?,
                ))
            })?;
            rows.collect()
        })
    }

    /// Task `id`, if kept.
    pub fn get(&self, id: &Uuid) -> Result<Option<TaskView>, StoreError> {
        self.read("looking up a task", |conn| {
            conn.query_row(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"),
                [id.as_bytes().as_slice()],
                task_of,
            )
            .optional()
        })
    }

    /// The tasks of workflow run `run` (its own result included), at most
    /// `limit`.
    pub fn run(&self, run: &Uuid, limit: usize) -> Result<Vec<TaskView>, StoreError> {
        self.read("reading a workflow run", |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE run_id = ?1 OR id = ?1 LIMIT ?2"
            ))?;
            let rows = statement.query_map(
                params![
                    run.as_bytes().as_slice(),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                task_of,
            )?;
            rows.collect()
        })
    }

    /// The task first submitted with `key` within the window ending at
    /// `now`.
    pub fn idempotent(&self, key: &str, now: i64) -> Result<Option<Uuid>, StoreError> {
        let oldest = now.saturating_sub(self.limits.idempotency_window_ms);
        self.read("looking up an idempotency key", |conn| {
            conn.query_row(
                "SELECT id FROM keys WHERE key = ?1 AND at > ?2",
                params![key, oldest],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .optional()
        })
        .map(|found| found.and_then(|bytes| Uuid::from_slice(&bytes).ok()))
    }

    /// A page of tasks, newest first (by the time the store first learned
    /// of each: its submission, or its first record read).
    pub fn tasks(&self, filter: &Filter) -> Result<Page<TaskView>, StoreError> {
        let (clause, values) = where_clause(filter, "type", true);
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks {clause} ORDER BY created_at DESC, seq DESC LIMIT {}",
            filter.limit
        );
        let items = self.read("listing tasks", |conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(params_from_iter(values.iter()), |row| {
                Ok((
                    task_of(row)?,
                    row.get::<_, i64>(23)?,
                    row.get::<_, i64>(24)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(page(items, filter.limit))
    }

    /// A page of workflow runs, newest first.
    pub fn runs(&self, filter: &Filter) -> Result<Page<RunSummary>, StoreError> {
        let (clause, values) = where_clause(filter, "name", false);
        let sql = format!(
            "SELECT id, name, status, created_at, finished_at, seq FROM runs {clause} \
             ORDER BY created_at DESC, seq DESC LIMIT {}",
            filter.limit
        );
        let items = self.read("listing workflow runs", |conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(params_from_iter(values.iter()), |row| {
                let id = Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?).unwrap_or_default();
                let created_at: i64 = row.get(3)?;
                Ok((
                    RunSummary {
                        id,
                        name: row.get(1)?,
                        status: row.get(2)?,
                        created_at,
                        finished_at: row.get(4)?,
                    },
                    created_at,
                    row.get::<_, i64>(5)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(page(items, filter.limit))
    }

    /// How many tasks are kept (a full count: for the metrics, now and
    /// then).
    pub fn count(&self) -> Result<i64, StoreError> {
        self.read("counting tasks", |conn| {
            conn.query_row("SELECT count(*) FROM tasks", [], |row| row.get(0))
        })
    }
}

/// The `WHERE` clause of a list query and its values, in order.
fn where_clause(
    filter: &Filter,
    name_column: &str,
    tasks: bool,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut terms = Vec::new();
    let mut values = Vec::new();
    if let Some(name) = &filter.name {
        terms.push(format!("{name_column} = ?"));
        values.push(Value::Text(name.clone()));
    }
    if let Some(status) = &filter.status {
        terms.push("status = ?".to_owned());
        values.push(Value::Text(status.clone()));
    }
    if let (Some(key), true) = (&filter.key, tasks) {
        terms.push("idem_key = ?".to_owned());
        values.push(Value::Text(key.clone()));
    }
    if let Some(since) = filter.since {
        terms.push("created_at >= ?".to_owned());
        values.push(Value::Integer(since));
    }
    if let Some(until) = filter.until {
        terms.push("created_at < ?".to_owned());
        values.push(Value::Integer(until));
    }
    if let Some(cursor) = filter.cursor {
        terms.push("(created_at, seq) < (?, ?)".to_owned());
        values.push(Value::Integer(cursor.at));
        values.push(Value::Integer(cursor.seq));
    }
    if terms.is_empty() {
        (String::new(), values)
    } else {
        (format!("WHERE {}", terms.join(" AND ")), values)
    }
}

/// A page from rows with their places; a full page may have a next one.
fn page<T>(rows: Vec<(T, i64, i64)>, limit: usize) -> Page<T> {
    let next = (rows.len() >= limit)
        .then(|| {
            rows.last()
                .map(|(_, at, seq)| Cursor { at: *at, seq: *seq })
        })
        .flatten();
    Page {
        items: rows.into_iter().map(|(item, _, _)| item).collect(),
        next,
    }
}

fn phase_of(name: &str) -> Phase {
    match name {
        "scheduled" => Phase::Scheduled,
        "running" => Phase::Running,
        "retrying" => Phase::Retrying,
        "succeeded" => Phase::Succeeded,
        "failed" => Phase::Failed,
        "cancelled" => Phase::Cancelled,
        _ => Phase::Queued,
    }
}

/// A task from a row selected with [`TASK_COLUMNS`].
fn task_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskView> {
    let id = Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?).unwrap_or_default();
    let error = match (
        row.get::<_, Option<String>>(9)?,
        row.get::<_, Option<String>>(10)?,
    ) {
        (Some(kind), message) => Some(TaskError {
            kind,
            message: message.unwrap_or_default(),
        }),
        _ => None,
    };
    let workflow = match row.get::<_, Option<Vec<u8>>>(12)? {
        Some(run) => Some(WorkflowRef {
            id: Uuid::from_slice(&run).unwrap_or_default(),
            name: row.get::<_, Option<String>>(13)?.unwrap_or_default(),
            step: row.get::<_, Option<i32>>(14)?.unwrap_or(0),
            child_index: row.get(15)?,
            child_count: row.get(16)?,
        }),
        None => None,
    };
    let attempt = match (
        row.get::<_, Option<i64>>(18)?,
        row.get::<_, Option<i32>>(19)?,
    ) {
        (Some(started_at), Some(attempt)) => Some(Attempt {
            started_at,
            attempt,
            worker: row.get::<_, Option<String>>(20)?.unwrap_or_default(),
            token: None,
        }),
        _ => None,
    };
    let progress = match (
        row.get::<_, Option<Vec<u8>>>(21)?,
        row.get::<_, Option<i64>>(22)?,
    ) {
        (Some(value), Some(at)) => Some((value, at)),
        _ => None,
    };
    let output_size: Option<i64> = row.get(7)?;
    Ok(TaskView {
        id,
        task_type: row.get(1)?,
        phase: phase_of(&row.get::<_, String>(2)?),
        submitted_at: row.get(3)?,
        finished_at: row.get(4)?,
        attempts: row.get(5)?,
        output: row.get(6)?,
        output_size: output_size.and_then(|n| usize::try_from(n).ok()),
        content_type: row.get(8)?,
        error,
        traceparent: row.get(11)?,
        workflow,
        run_at: row.get(17)?,
        attempt,
        progress,
        retry_at: None,
        events: Default::default(),
        events_partition: None,
        idempotency_key: None,
        payload: row.get(25)?,
        payload_size: row
            .get::<_, Option<i64>>(26)?
            .and_then(|n| usize::try_from(n).ok()),
    })
}

enum Op {
    Task(Box<TaskView>, i64),
    Key { key: String, id: Uuid, at: i64 },
}

/// The store's one writer: batches what the follower applies and writes
/// it, with the offsets it came from, one transaction at a time.
pub struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: StoreLimits,
    pending: Vec<Op>,
    offsets: HashMap<(Arc<str>, i32), i64>,
    since: Instant,
}

impl Writer {
    /// Records `task` as it now stands (its latest record at `at`; its
    /// events are not kept: give it a [`TaskView::snapshot`]). Returns
    /// whether its output was cut.
    pub fn task(&mut self, mut task: TaskView, at: i64) -> bool {
        task.events = Default::default();
        let mut cut_short = false;
        if let Some(output) = &task.output {
            if output.len() > self.limits.max_output_bytes {
                task.output_size = Some(output.len());
                task.output = Some(cut(output, self.limits.max_output_bytes).to_vec());
                cut_short = true;
            }
        }
        // The payload is kept for the dashboard, within the same bound.
        if let Some(payload) = &task.payload {
            if payload.len() > self.limits.max_output_bytes {
                task.payload_size = Some(payload.len());
                task.payload = Some(cut(payload, self.limits.max_output_bytes).to_vec());
            }
        }
        self.pending.push(Op::Task(Box::new(task), at));
        cut_short
    }

    /// Records that `key` maps to task `id` from time `at` (unless it maps
    /// to another within the window).
    pub fn key(&mut self, key: &str, id: Uuid, at: i64) {
        self.pending.push(Op::Key {
            key: key.to_owned(),
            id,
            at,
        });
    }

    /// Records that everything before `offset + 1` of `topic`'s
    /// `partition` has been applied.
    pub fn applied(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        self.offsets
            .insert((topic.clone(), partition), offset.saturating_add(1));
    }

    /// Operations waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether the batch should be written now: it is full, or its oldest
    /// part waited `wait`.
    pub fn due(&self, wait: std::time::Duration) -> bool {
        self.pending.len() >= MAX_PENDING
            || (!(self.pending.is_empty() && self.offsets.is_empty())
                && self.since.elapsed() >= wait)
    }

    /// Writes the batch and its offsets in one transaction. On failure
    /// nothing of it is written and it stays pending.
    pub fn flush(&mut self) -> Result<usize, StoreError> {
        self.since = Instant::now();
        if self.pending.is_empty() && self.offsets.is_empty() {
            return Ok(0);
        }
        let path = self.path.clone();
        let window = self.limits.idempotency_window_ms;
        let tx = self
            .conn
            .transaction()
            .map_err(failed(&path, "starting a write"))?;
        {
            let mut upsert = tx
                .prepare_cached(UPSERT_TASK)
                .map_err(failed(&path, "preparing a write"))?;
            let mut upsert_run = tx
                .prepare_cached(UPSERT_RUN)
                .map_err(failed(&path, "preparing a write"))?;
            let mut key = tx
                .prepare_cached(
                    "INSERT INTO keys (key, id, at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET id = excluded.id, at = excluded.at
                     WHERE keys.at <= excluded.at - ?4",
                )
                .map_err(failed(&path, "preparing a write"))?;
            for op in &self.pending {
                match op {
                    Op::Task(task, at) => {
                        write_task(&mut upsert, task, *at)
                            .map_err(failed(&path, "writing a task"))?;
                        if let Some(w) = &task.workflow {
                            write_run(&mut upsert_run, task, w, *at)
                                .map_err(failed(&path, "writing a workflow run"))?;
                        }
                    }
                    Op::Key { key: k, id, at } => {
                        key.execute(params![k, id.as_bytes().as_slice(), at, window])
                            .map_err(failed(&path, "writing an idempotency key"))?;
                    }
                }
            }
            let mut offset = tx
                .prepare_cached(
                    "INSERT INTO offsets (topic, partition, next) VALUES (?1, ?2, ?3)
                     ON CONFLICT(topic, partition) DO UPDATE SET next = max(next, excluded.next)",
                )
                .map_err(failed(&path, "preparing a write"))?;
            for ((topic, partition), next) in &self.offsets {
                offset
                    .execute(params![topic.as_ref(), partition, next])
                    .map_err(failed(&path, "writing an offset"))?;
            }
        }
        tx.commit().map_err(failed(&path, "committing a write"))?;
        let written = self.pending.len();
        self.pending.clear();
        self.offsets.clear();
        Ok(written)
    }

    /// Removes tasks older than the retention, idempotency keys older than
    /// their window, and the oldest tasks while the pages in use exceed the
    /// disk budget (at most a bounded amount per call: the next goes on),
    /// then gives freed pages back to the file system.
    pub fn housekeep(&mut self, now: i64) -> Result<Removed, StoreError> {
        let path = self.path.clone();
        let mut removed = Removed::default();
        let oldest = now.saturating_sub(self.limits.retention_ms);
        for _ in 0..REMOVE_ROUNDS {
            let n = self
                .conn
                .execute(
                    "DELETE FROM tasks WHERE seq IN
                     (SELECT seq FROM tasks WHERE updated_at < ?1 ORDER BY updated_at LIMIT ?2)",
                    params![oldest, REMOVE_CHUNK],
                )
                .map_err(failed(&path, "removing expired tasks"))?;
            removed.expired += n as u64;
            if (n as i64) < REMOVE_CHUNK {
                break;
            }
        }
        self.conn
            .execute("DELETE FROM runs WHERE updated_at < ?1", [oldest])
            .map_err(failed(&path, "removing expired runs"))?;
        let oldest_key = now.saturating_sub(self.limits.idempotency_window_ms);
        self.conn
            .execute("DELETE FROM keys WHERE at <= ?1", [oldest_key])
            .map_err(failed(&path, "removing expired idempotency keys"))?;
        for _ in 0..REMOVE_ROUNDS {
            if self.usage()?.used_bytes <= self.limits.max_bytes {
                break;
            }
            let n = self
                .conn
                .execute(
                    "DELETE FROM tasks WHERE seq IN
                     (SELECT seq FROM tasks ORDER BY updated_at LIMIT ?1)",
                    [REMOVE_CHUNK],
                )
                .map_err(failed(&path, "removing the oldest tasks"))?;
            removed.over_budget += n as u64;
            if n == 0 {
                break;
            }
            // The runs whose tasks are all gone go with them.
            self.conn
                .execute(
                    "DELETE FROM runs WHERE updated_at < coalesce((SELECT min(updated_at) FROM tasks), ?1)",
                    [i64::MAX],
                )
                .map_err(failed(&path, "removing the oldest runs"))?;
        }
        if removed != Removed::default() {
            self.conn
                .execute_batch("PRAGMA incremental_vacuum;")
                .map_err(failed(&path, "returning freed pages"))?;
        }
        Ok(removed)
    }

    /// What the store takes.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let pragma = |name: &str| -> Result<u64, StoreError> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get::<_, i64>(0))
                .map(|v| u64::try_from(v).unwrap_or(0))
                .map_err(failed(&self.path, "measuring its size"))
        };
        let (pages, free, size) = (
            pragma("page_count")?,
            pragma("freelist_count")?,
            pragma("page_size")?,
        );
        let file = |suffix: &str| {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            std::fs::metadata(name).map(|m| m.len()).unwrap_or(0)
        };
        Ok(Usage {
            used_bytes: pages.saturating_sub(free).saturating_mul(size),
            file_bytes: file("") + file("-wal"),
        })
    }
}

/// The longest prefix of `bytes` within `max` that does not end inside a
/// UTF-8 character (when the bytes are UTF-8 text up to there).
fn cut(bytes: &[u8], max: usize) -> &[u8] {
    let head = bytes.get(..max).unwrap_or(bytes);
    match std::str::from_utf8(head) {
        Err(e) if e.error_len().is_none() => head.get(..e.valid_up_to()).unwrap_or(head),
        _ => head,
    }
}

/// Inserts a task, or merges it into the row kept: a terminal row keeps
/// its outcome; request facts fill what is missing; the latest attempt and
/// progress win; its place in the lists (`created_at`, `seq`) never moves.
const UPSERT_TASK: &str = "
INSERT INTO tasks (id, type, status, created_at, updated_at, submitted_at, finished_at, attempts,
    output, output_size, content_type, error_kind, error_message, traceparent, run_id, run_name,
    step, child_index, child_count, run_at, started_at, attempt, worker, progress, progress_at,
    idem_key, payload, payload_size)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
    ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)
ON CONFLICT(id) DO UPDATE SET
    status = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.status
        WHEN excluded.status = 'queued' AND tasks.status IN ('running','retrying') THEN tasks.status
        WHEN excluded.status = 'scheduled' AND tasks.status <> 'scheduled' THEN tasks.status
        ELSE excluded.status END,
    updated_at = max(tasks.updated_at, excluded.updated_at),
    submitted_at = coalesce(tasks.submitted_at, excluded.submitted_at),
    finished_at = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.finished_at ELSE excluded.finished_at END,
    attempts = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.attempts ELSE excluded.attempts END,
    output = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.output ELSE excluded.output END,
    output_size = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.output_size ELSE excluded.output_size END,
    content_type = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.content_type ELSE excluded.content_type END,
    error_kind = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.error_kind ELSE excluded.error_kind END,
    error_message = CASE WHEN tasks.status IN ('succeeded','failed','cancelled') THEN tasks.error_message ELSE excluded.error_message END,
    traceparent = coalesce(tasks.traceparent, excluded.traceparent),
    run_id = coalesce(tasks.run_id, excluded.run_id),
    run_name = coalesce(tasks.run_name, excluded.run_name),
    step = coalesce(tasks.step, excluded.step),
    child_index = coalesce(tasks.child_index, excluded.child_index),
    child_count = coalesce(tasks.child_count, excluded.child_count),
    run_at = coalesce(tasks.run_at, excluded.run_at),
    started_at = coalesce(excluded.started_at, tasks.started_at),
    attempt = coalesce(excluded.attempt, tasks.attempt),
    worker = coalesce(excluded.worker, tasks.worker),
    progress = coalesce(excluded.progress, tasks.progress),
    progress_at = coalesce(excluded.progress_at, tasks.progress_at),
    idem_key = coalesce(tasks.idem_key, excluded.idem_key),
    payload = coalesce(tasks.payload, excluded.payload),
    payload_size = coalesce(tasks.payload_size, excluded.payload_size)
";

fn write_task(
    statement: &mut rusqlite::CachedStatement<'_>,
    task: &TaskView,
    at: i64,
) -> rusqlite::Result<usize> {
    let w = task.workflow.as_ref();
    let created = task.submitted_at.or(task.finished_at).unwrap_or(at);
    let output_size = task.output_size.and_then(|n| i64::try_from(n).ok());
    statement.execute(params![
        task.id.as_bytes().as_slice(),
        task.task_type,
        task.phase.name(),
        created,
        at,
        task.submitted_at,
        task.finished_at,
        task.attempts,
        task.output,
        output_size,
        task.content_type,
        task.error.as_ref().map(|e| e.kind.as_str()),
        task.error.as_ref().map(|e| e.message.as_str()),
        task.traceparent,
        w.map(|w| w.id.as_bytes().to_vec()),
        w.map(|w| w.name.as_str()),
        w.map(|w| w.step),
        w.and_then(|w| w.child_index),
        w.and_then(|w| w.child_count),
        task.run_at,
        task.attempt.as_ref().map(|a| a.started_at),
        task.attempt.as_ref().map(|a| a.attempt),
        task.attempt.as_ref().map(|a| a.worker.as_str()),
        task.progress.as_ref().map(|(p, _)| p.as_slice()),
        task.progress.as_ref().map(|(_, at)| *at),
        task.idempotency_key,
        task.payload,
        task.payload_size.and_then(|n| i64::try_from(n).ok()),
    ])
}

/// A run's row: created when any of its tasks is first seen, `running`
/// once one starts or ends, and given its outcome by its own result (the
/// task whose id is the run's).
const UPSERT_RUN: &str = "
INSERT INTO runs (id, name, status, created_at, updated_at, finished_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT(id) DO UPDATE SET
    status = CASE WHEN runs.status IN ('succeeded','failed','cancelled') THEN runs.status
        WHEN excluded.status = 'queued' THEN runs.status
        ELSE excluded.status END,
    updated_at = max(runs.updated_at, excluded.updated_at),
    finished_at = coalesce(runs.finished_at, excluded.finished_at)
";

fn write_run(
    statement: &mut rusqlite::CachedStatement<'_>,
    task: &TaskView,
    run: &WorkflowRef,
    at: i64,
) -> rusqlite::Result<usize> {
    let own_result = task.id == run.id && task.phase.is_terminal();
    let status = if own_result {
        task.phase.name()
    } else if matches!(task.phase, Phase::Queued | Phase::Scheduled) {
        "queued"
    } else {
        "running"
    };
    let created = task.submitted_at.or(task.finished_at).unwrap_or(at);
    statement.execute(params![
        run.id.as_bytes().as_slice(),
        run.name,
        status,
        created,
        at,
        own_result.then_some(task.finished_at).flatten(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> StoreLimits {
        StoreLimits {
            retention_ms: 10_000,
            max_bytes: 1 << 30,
            max_output_bytes: 8,
            idempotency_window_ms: 1_000,
        }
    }

    fn queued(at: i64, task_type: &str) -> TaskView {
        TaskView {
            submitted_at: Some(at),
            ..TaskView::bare(Uuid::new_v4(), task_type.to_owned())
        }
    }

    #[test]
    fn a_result_merges_into_its_request_and_a_late_request_changes_nothing() {
        let (store, mut writer) = Store::open("", limits()).unwrap();
        let mut task = queued(10, "echo");
        task.traceparent = Some("tp".into());
        writer.task(task.clone(), 10);
        writer.flush().unwrap();
        assert_eq!(store.get(&task.id).unwrap().unwrap().phase, Phase::Queued);
        // The result alone (the view forgot the request): submitted_at and
        // traceparent stay; the output is cut to 8 bytes, marked.
        let mut done = TaskView::bare(task.id, "echo".into());
        done.phase = Phase::Succeeded;
        done.finished_at = Some(20);
        done.attempts = Some(1);
        done.output = Some(b"0123456789".to_vec());
        writer.task(done, 20);
        // A duplicate request read after it.
        writer.task(task.clone(), 21);
        writer.flush().unwrap();
        let kept = store.get(&task.id).unwrap().unwrap();
        assert_eq!(kept.phase, Phase::Succeeded);
        assert_eq!(kept.submitted_at, Some(10));
        assert_eq!(kept.traceparent.as_deref(), Some("tp"));
        assert_eq!(kept.output.as_deref(), Some(b"01234567".as_slice()));
        assert_eq!(kept.output_size, Some(10));
        assert_eq!(kept.finished_at, Some(20));
    }

    #[test]
    fn the_payload_is_kept_cut_to_the_bound_and_a_store_of_before_gets_its_columns() {
        // A store made before payloads were kept: the tasks table without
        // the two columns, one row in it.
        let path =
            std::env::temp_dir().join(format!("conveyor-store-{}.db", Uuid::new_v4().simple()));
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        let before = queued(5, "echo");
        write_task_old(&old, &before);
        drop(old);
        let (store, mut writer) = Store::open(path.to_str().unwrap(), limits()).unwrap();
        let kept = store.get(&before.id).unwrap().unwrap();
        assert_eq!((kept.payload, kept.payload_size), (None, None));
        let mut task = queued(10, "echo");
        task.payload = Some(b"<payload of 23 bytes!!>".to_vec());
        writer.task(task.clone(), 10);
        // The same request again without its payload (the view's copy)
        // keeps it.
        task.payload = None;
        writer.task(task.clone(), 11);
        writer.flush().unwrap();
        let kept = store.get(&task.id).unwrap().unwrap();
        assert_eq!(kept.payload.as_deref(), Some(b"<payload".as_slice()));
        assert_eq!(kept.payload_size, Some(23));
        drop(store);
        let _ = std::fs::remove_file(&path);
    }

    /// A row as the store wrote it before payloads were kept.
    fn write_task_old(conn: &Connection, task: &TaskView) {
        conn.execute(
            "INSERT INTO tasks (id, type, status, created_at, updated_at) VALUES (?1, ?2, 'queued', ?3, ?3)",
            params![task.id.as_bytes().as_slice(), task.task_type, task.submitted_at],
        )
        .unwrap();
    }

    #[test]
    fn offsets_are_written_with_their_rows_and_a_failed_write_keeps_both_pending() {
        let (store, mut writer) = Store::open("", limits()).unwrap();
        let topic: Arc<str> = Arc::from("results");
        writer.task(queued(1, "echo"), 1);
        writer.applied(&topic, 2, 41);
        writer.flush().unwrap();
        assert_eq!(store.offsets().unwrap()[&("results".to_owned(), 2)], 42);
        // A write the database refuses (a row with a type too long for a
        // CHECK the test adds) leaves nothing behind and stays pending.
        writer
            .conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON tasks WHEN new.type = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        writer.task(queued(2, "ok"), 2);
        writer.task(queued(3, "bad"), 3);
        writer.applied(&topic, 2, 43);
        assert!(writer.flush().is_err());
        assert_eq!(writer.pending(), 2);
        assert_eq!(store.count().unwrap(), 1, "nothing of the batch written");
        assert_eq!(store.offsets().unwrap()[&("results".to_owned(), 2)], 42);
    }

    #[test]
    fn list_pages_follow_newest_first_without_gaps_or_repeats() {
        let (store, mut writer) = Store::open("", limits()).unwrap();
        let mut all = Vec::new();
        for i in 0..25 {
            let t = queued(100 + i / 2, if i % 2 == 0 { "a" } else { "b" });
            writer.task(t.clone(), 100 + i / 2);
            all.push(t.id);
        }
        writer.flush().unwrap();
        let mut seen = Vec::new();
        let mut filter = Filter {
            limit: 4,
            ..Filter::default()
        };
        loop {
            let page = store.tasks(&filter).unwrap();
            seen.extend(page.items.iter().map(|t| t.id));
            // More arrive between pages: never in the pages already begun.
            writer.task(queued(1_000, "a"), 1_000);
            writer.flush().unwrap();
            match page.next {
                Some(next) => filter.cursor = Some(next),
                None => break,
            }
        }
        let mut expected = all.clone();
        expected.reverse();
        assert_eq!(seen, expected);
        let only_a = store
            .tasks(&Filter {
                name: Some("a".into()),
                since: Some(101),
                until: Some(104),
                limit: 100,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(only_a.items.len(), 3);
        assert!(only_a.items.iter().all(|t| t.task_type == "a"));
        assert!(only_a.next.is_none());
    }

    #[test]
    fn retention_and_the_disk_budget_remove_the_oldest() {
        let (store, mut writer) = Store::open("", limits()).unwrap();
        let old = queued(1_000, "echo");
        let new = queued(9_000, "echo");
        writer.task(old.clone(), 1_000);
        writer.task(new.clone(), 9_000);
        writer.key("k", old.id, 1_000);
        writer.flush().unwrap();
        assert_eq!(store.idempotent("k", 1_500).unwrap(), Some(old.id));
        let removed = writer.housekeep(12_000).unwrap();
        assert_eq!(removed.expired, 1);
        assert!(store.get(&old.id).unwrap().is_none());
        assert!(store.get(&new.id).unwrap().is_some());
        assert_eq!(
            store.idempotent("k", 1_500).unwrap(),
            None,
            "the key expired"
        );
        // A budget below what is in use removes the oldest until within.
        // Removal goes by REMOVE_CHUNK (2,000) tasks: with many chunks'
        // worth, halving the budget leaves several chunks (with 3,000, half
        // sat at one chunk's edge and a pass could take them all).
        for i in 0..10_000 {
            writer.task(queued(10_000 + i, "echo"), 10_000 + i);
            if i % 2_000 == 1_999 {
                writer.flush().unwrap();
            }
        }
        writer.flush().unwrap();
        let used = writer.usage().unwrap().used_bytes;
        writer.limits.max_bytes = used / 2;
        let removed = writer.housekeep(12_000).unwrap();
        assert!(removed.over_budget > 0);
        assert!(writer.usage().unwrap().used_bytes <= used / 2);
        assert!(
            store.get(&new.id).unwrap().is_none(),
            "the oldest went first"
        );
        let newest = store
            .tasks(&Filter {
                limit: 1,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(newest.items[0].submitted_at, Some(19_999));
    }

    #[test]
    fn cursors_round_trip_and_refuse_what_they_did_not_make() {
        let c = Cursor {
            at: 1_700_000_000_000,
            seq: 42,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(c.encode(), "1700000000000.42");
        assert_eq!(Cursor::decode("-5.0"), Some(Cursor { at: -5, seq: 0 }));
        let too_long = format!("{}.1", "9".repeat(19));
        for bad in [
            "", "x", "1", "1.", ".1", "1.-1", "+1.1", "1.1.1", "١.1", &too_long,
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn cut_keeps_utf8_whole() {
        assert_eq!(cut("aé".as_bytes(), 2), b"a");
        assert_eq!(cut(b"abc", 2), b"ab");
        assert_eq!(cut(&[0xff, 0xfe, 0xfd], 2), &[0xff, 0xfe]);
    }

    #[test]
    fn a_temporary_store_is_removed_with_its_files() {
        let (store, writer) = Store::open("", limits()).unwrap();
        let path = store.path().to_owned();
        assert!(path.exists());
        drop(writer);
        drop(store);
        assert!(!path.exists());
    }
}
