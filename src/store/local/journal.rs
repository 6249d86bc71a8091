//! What processes sharing one state file tell each other while they share it (the old and the
//! new process of a zero-downtime upgrade): every hold, commit, adjustment and spent single-use
//! id, appended as a JSON line to `<state>.journal` under the state file's lock. Each process
//! reads the lines the others appended before it decides anything, so a budget is checked
//! against every process's calls, in flight and counted, at once.
//!
//! Each process also holds a slot beside the state file, `<state>.process.<n>`, locked (flock)
//! for its whole life: a slot that can be locked is a process that is gone (exited or crashed),
//! whose holds are then dropped by the others.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How many processes may share one state file at once: two during an upgrade, three if
/// another starts before the old one has drained.
pub(super) const SLOTS: usize = 8;

/// This process's slot: locked until it is dropped (or the process ends, however it ends).
pub(super) struct Slot {
    pub index: usize,
    _file: File,
}

fn beside(state: &Path, suffix: &str) -> PathBuf {
    let mut name = state
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    state.with_file_name(name)
}

fn slot_path(state: &Path, n: usize) -> PathBuf {
    beside(state, &format!(".process.{n}"))
}

pub(super) fn journal_path(state: &Path) -> PathBuf {
    beside(state, ".journal")
}

/// Take the first free slot, and write this process's id in it (for the operator who wonders
/// whose it is).
pub(super) fn take_slot(state: &Path) -> io::Result<Slot> {
    for n in 0..SLOTS {
        let path = slot_path(state, n);
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(named)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(named)?;
                writeln!(file, "{}", std::process::id()).map_err(named)?;
                return Ok(Slot {
                    index: n,
                    _file: file,
                });
            }
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => return Err(named(e)),
        }
    }
    Err(io::Error::other(format!(
        "{SLOTS} processes already share {}",
        state.display()
    )))
}

/// Which slots other than `mine` a live process holds now.
pub(super) fn live_slots(state: &Path, mine: usize) -> io::Result<[bool; SLOTS]> {
    let mut live = [false; SLOTS];
    for (n, live) in live.iter_mut().enumerate().filter(|(n, _)| *n != mine) {
        let file = match File::open(slot_path(state, n)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // Locked by this check for a moment only: closing the file unlocks it.
        *live = match file.try_lock() {
            Ok(()) => false,
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Error(e)) => return Err(e),
        };
    }
    Ok(live)
}

/// A series that budgets are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Series {
    Days,
    Months,
    Subjects,
    /// A subject's failed verdicts of a day (counted only: nothing is held in them).
    Failed,
}

/// One line: a process (its id for this run), its sequence number (a line written twice, by a
/// write retried after a failure, is applied once), and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Line {
    pub p: String,
    pub q: u64,
    #[serde(flatten)]
    pub entry: Entry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Entry {
    /// The process in `slot` counts through the journal from now on.
    Join { slot: usize, pid: u32 },
    /// Calls of a tenant in these periods: `held` more in flight (fewer when negative), and
    /// `counted` more counted (fewer: a refund).
    Tally {
        t: String,
        k: Vec<(Series, String)>,
        #[serde(default, skip_serializing_if = "is_zero")]
        held: i64,
        #[serde(default, skip_serializing_if = "is_zero")]
        counted: i64,
    },
    /// A single-use id spent (its digest), remembered until `until` (Unix milliseconds).
    Spent { id: String, until: i64 },
    /// A spent id given back (its request was refused before any answer).
    Unspent { id: String },
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct Header {
    journal: u32,
    epoch: String,
}

/// The journal as one process reads and appends it. Every call is made under the state file's
/// lock.
pub(super) struct Journal {
    file: File,
    /// Written into the state file when the journal's counts are added to it, so that a crash
    /// between that write and the journal's removal does not add them twice.
    pub epoch: String,
    /// What this process has read (or written) so far.
    offset: u64,
    /// Appended since the last `sync`.
    unsynced: bool,
}

impl Journal {
    /// The journal beside `state`: the one there (unless its counts were already added to the
    /// state file, `folded`), or a new one.
    pub fn open(state: &Path, folded: Option<&str>) -> io::Result<Journal> {
        let path = journal_path(state);
        if let Some(j) = Journal::existing(&path)? {
            if Some(j.epoch.as_str()) != folded {
                return Ok(j);
            }
            std::fs::remove_file(&path)?;
        }
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        let mut head = serde_json::to_vec(&Header {
            journal: 1,
            epoch: epoch.clone(),
        })
        .map_err(io::Error::other)?;
        head.push(b'\n');
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)?;
        (&file).write_all(&head)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(Journal {
            file,
            epoch,
            offset: head.len() as u64,
            unsynced: false,
        })
    }

    /// The journal at `path`, if there is one with a readable first line. One without (its
    /// creator died while writing it) holds nothing and is removed.
    fn existing(path: &Path) -> io::Result<Option<Journal>> {
        let file = match OpenOptions::new().read(true).append(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut head = vec![0; 256];
        let n = file.read_at(&mut head, 0)?;
        let header = head[..n]
            .iter()
            .position(|b| *b == b'\n')
            .and_then(|end| Some((end, serde_json::from_slice::<Header>(&head[..end]).ok()?)));
        let Some((end, header)) = header else {
            std::fs::remove_file(path)?;
            return Ok(None);
        };
        Ok(Some(Journal {
            file,
            epoch: header.epoch,
            offset: end as u64 + 1,
            unsynced: false,
        }))
    }

    pub fn exists(state: &Path) -> bool {
        journal_path(state).exists()
    }

    pub fn remove(state: &Path) -> io::Result<()> {
        match std::fs::remove_file(journal_path(state)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The whole lines appended since the last read. A line that cannot be read (the tail of a
    /// write cut short by a crash) is skipped; a partial last line waits for its end.
    pub fn read_new(&mut self) -> io::Result<Vec<Line>> {
        let len = self.file.metadata()?.len();
        if len <= self.offset {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; (len - self.offset) as usize];
        self.file.read_exact_at(&mut buf, self.offset)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        self.offset += end as u64 + 1;
        let mut lines = Vec::new();
        for raw in buf[..end].split(|b| *b == b'\n') {
            match serde_json::from_slice::<Line>(raw) {
                Ok(line) => lines.push(line),
                Err(e) => tracing::warn!(
                    "budget journal: a line that cannot be read is skipped (a write cut short): {e}"
                ),
            }
        }
        Ok(lines)
    }

    /// Append `lines` in one write, after everything read so far. Bytes left by a write cut
    /// short get their line ended first, so that they spoil no line of these.
    pub fn append(&mut self, lines: &[Line]) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        let mut buf = Vec::new();
        if len > self.offset {
            buf.push(b'\n');
        }
        for line in lines {
            serde_json::to_writer(&mut buf, line).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.unsynced = true;
        (&self.file).write_all(&buf)?;
        // Under the lock nobody else wrote meanwhile: what follows `len` is these lines.
        self.offset = len + buf.len() as u64;
        Ok(())
    }

    /// Make what was appended durable (once a flush interval: a crash of the machine loses at
    /// most that, as with the state file).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(q: u64, entry: Entry) -> Line {
        Line {
            p: "a".into(),
            q,
            entry,
        }
    }

    #[test]
    fn a_write_cut_short_spoils_no_other_line() {
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("budgets.json");
        let mut a = Journal::open(&state, None).expect("open");
        let mut b = Journal::open(&state, None).expect("the same journal");
        assert_eq!(a.epoch, b.epoch);
        let spent = |q| {
            line(
                q,
                Entry::Spent {
                    id: "ab".into(),
                    until: 1,
                },
            )
        };
        a.append(&[spent(1)]).expect("append");
        // A process died in the middle of a line.
        OpenOptions::new()
            .append(true)
            .open(journal_path(&state))
            .expect("open")
            .write_all(br#"{"p":"dead","q":1,"op":"ta"#)
            .expect("write");
        assert_eq!(b.read_new().expect("read"), vec![spent(1)]);
        a.read_new().expect("read");
        a.append(&[spent(2)]).expect("append");
        assert_eq!(b.read_new().expect("read"), vec![spent(2)]);
        // A journal whose counts the state file already has is not read again.
        let c = Journal::open(&state, Some(&a.epoch)).expect("a new one");
        assert_ne!(c.epoch, a.epoch);
    }

    #[test]
    fn a_slot_is_free_once_its_process_is_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("budgets.json");
        let first = take_slot(&state).expect("slot");
        let second = take_slot(&state).expect("slot");
        assert_eq!((first.index, second.index), (0, 1));
        assert!(live_slots(&state, 0).expect("live")[1]);
        assert!(live_slots(&state, 1).expect("live")[0]);
        drop(first);
        assert!(!live_slots(&state, 1).expect("live")[0]);
        assert_eq!(take_slot(&state).expect("slot").index, 0);
    }
}
