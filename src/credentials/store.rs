//! Where the lockout guard's numbers live between logins and across restarts (SPEC §5): the
//! [`GuardStore`] seam, an in-memory store (loopback upstreams only) and the guard file.
//!
//! The guard file belongs to one process: `<guard_file>.lock` is held under an exclusive lock
//! for the life of the process (the data file itself is replaced on every write, so it cannot
//! carry the lock). Every write goes to a temporary file, is synced, renamed over the data file,
//! and the directory is synced, so a crash leaves either the old numbers or the new ones.
//! In fleet mode (SPEC §10) the fleet's numbers live in Redis; a guard file, when configured,
//! keeps this replica's memory of them (with their epoch).

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// What an unreadable or corrupt guard file counts as: one login left before the stop.
pub const UNREADABLE_ATTEMPTS: u32 = 3;

/// One username's numbers as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Logins rejected for credentials in a row.
    pub rejected: u32,
    /// Logins sent since the last accepted one (charged before sending).
    pub attempts: u32,
    /// Wall-clock end of the login pause, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<String>,
    /// No login until `POST /credentials/reset`.
    #[serde(default)]
    pub stopped: bool,
    /// ThingSpace answered that the user is locked.
    #[serde(default)]
    pub locked: bool,
    /// Truncated SHA-256 of the username and password of the last attempt (never the password):
    /// tells a restart with changed credentials from one with the same.
    #[serde(default)]
    pub fingerprint: String,
    /// Fleet mode: the epoch (Redis's time, ms, of the last accepted login or reset) these
    /// numbers belong to; 0 in a single process.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub type SaveFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The numbers per ThingSpace username, kept where they outlive a login (and, for the file and
/// Redis, the process).
pub trait GuardStore: Send + Sync + 'static {
    /// The numbers stored for `username` (read once, at start).
    fn load(&self, username: &str) -> Record;
    /// Stores `record` durably; a login is sent only after this succeeded.
    fn save<'a>(&'a self, username: &'a str, record: Record) -> SaveFuture<'a>;
}

/// Numbers that last as long as the process: only for a loopback upstream (tests, the demo),
/// whose simulator forgets its lock on restart too.
#[derive(Default)]
pub struct MemoryStore(Mutex<HashMap<String, Record>>);

impl GuardStore for MemoryStore {
    fn load(&self, username: &str) -> Record {
        let m = self.0.lock();
        m.get(username).cloned().unwrap_or_default()
    }

    fn save<'a>(&'a self, username: &'a str, record: Record) -> SaveFuture<'a> {
        let mut m = self.0.lock();
        m.insert(username.to_string(), record);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The guard file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    version: u32,
    #[serde(default)]
    users: BTreeMap<String, Record>,
    /// Set once the file was found unreadable: a username not listed starts with this many
    /// attempts instead of none (its real count was in the lost content).
    #[serde(default)]
    unlisted_attempts: u32,
}

const VERSION: u32 = 1;

/// `credentials.guard_file`: one process's numbers, on disk.
pub struct FileStore {
    path: PathBuf,
    /// Held (locked) for the life of the process; released when dropped.
    _lock: File,
    doc: Mutex<Doc>,
    /// Writes in order: the last save is the one on disk.
    write: tokio::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "credentials.guard_file {path}: in use by another gateway process (its lock {lock} is \
         held); two processes must not share one ThingSpace user's login counts"
    )]
    InUse { path: String, lock: String },
    #[error("credentials.guard_file {path}: {error}")]
    Io { path: String, error: String },
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

impl FileStore {
    /// Takes the lock and reads the numbers. A missing file is a first start (no numbers); an
    /// unreadable or corrupt one counts as [`UNREADABLE_ATTEMPTS`] for every user.
    pub fn open(path: &Path) -> Result<FileStore, OpenError> {
        let shown = path.display().to_string();
        let lock = lock_path(path);
        let io = |e: std::io::Error| OpenError::Io {
            path: shown.clone(),
            error: e.to_string(),
        };
        let file = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::InUse {
                    path: shown,
                    lock: lock.display().to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let doc = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Doc {
                version: VERSION,
                ..Doc::default()
            },
            Err(e) => unreadable(&shown, &e.to_string()),
            Ok(bytes) => match serde_json::from_slice::<Doc>(&bytes) {
                Ok(d) if d.version == VERSION => d,
                Ok(d) => unreadable(&shown, &format!("unknown version {}", d.version)),
                Err(e) => unreadable(&shown, &e.to_string()),
            },
        };
        Ok(FileStore {
            path: path.to_path_buf(),
            _lock: file,
            doc: Mutex::new(doc),
            write: tokio::sync::Mutex::new(()),
        })
    }
}

fn unreadable(path: &str, why: &str) -> Doc {
    tracing::error!(
        guard_file = path,
        error = why,
        "the guard file is unreadable: counting {UNREADABLE_ATTEMPTS} login attempts for every \
         user (one login before the stop)"
    );
    Doc {
        version: VERSION,
        users: BTreeMap::new(),
        unlisted_attempts: UNREADABLE_ATTEMPTS,
    }
}

/// Temporary file, sync, rename over `path`, sync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl GuardStore for FileStore {
    fn load(&self, username: &str) -> Record {
        let doc = self.doc.lock();
        doc.users.get(username).cloned().unwrap_or(Record {
            attempts: doc.unlisted_attempts,
            ..Record::default()
        })
    }

    fn save<'a>(&'a self, username: &'a str, record: Record) -> SaveFuture<'a> {
        Box::pin(async move {
            let _order = self.write.lock().await;
            let bytes = {
                let mut doc = self.doc.lock();
                doc.users.insert(username.to_string(), record);
                serde_json::to_vec_pretty(&*doc).map_err(|e| e.to_string())?
            };
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e}", self.path.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tsgw-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn numbers_survive_a_reopen_per_user() {
        let path = temp_dir("reopen").join("g.guard");
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.load("a"), Record::default());
        let rec = Record {
            rejected: 2,
            attempts: 2,
            paused_until: Some("2030-01-01T00:00:00Z".into()),
            fingerprint: "abc".into(),
            ..Record::default()
        };
        s.save("a", rec.clone()).await.unwrap();
        s.save("b", Record::default()).await.unwrap();
        drop(s);
        let s = FileStore::open(&path).unwrap();
        assert_eq!(
            s.load("a"),
            rec,
            "a change of username keeps the other's numbers"
        );
        assert_eq!(s.load("b"), Record::default());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let path = temp_dir("lock").join("g.guard");
        let first = FileStore::open(&path).unwrap();
        let e = FileStore::open(&path).err().unwrap();
        assert!(matches!(e, OpenError::InUse { .. }), "{e}");
        assert!(e.to_string().starts_with("credentials.guard_file"), "{e}");
        drop(first);
        FileStore::open(&path).unwrap();
    }

    #[tokio::test]
    async fn corrupt_file_counts_three_attempts_for_everyone() {
        let path = temp_dir("corrupt").join("g.guard");
        std::fs::write(&path, b"{\"version\":1,\"users\":{\"a\":{\"rejec").unwrap();
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.load("a").attempts, UNREADABLE_ATTEMPTS);
        s.save("a", Record::default()).await.unwrap();
        drop(s);
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.load("a").attempts, 0);
        assert_eq!(
            s.load("other").attempts,
            UNREADABLE_ATTEMPTS,
            "users whose numbers were lost stay at three"
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_reported() {
        let dir = temp_dir("nowrite");
        let path = dir.join("sub").join("g.guard");
        assert!(matches!(FileStore::open(&path), Err(OpenError::Io { .. })));
        let path = dir.join("g.guard");
        let s = FileStore::open(&path).unwrap();
        std::fs::create_dir_all(dir.join("g.guard.tmp")).unwrap();
        assert!(s.save("a", Record::default()).await.is_err());
    }
}
