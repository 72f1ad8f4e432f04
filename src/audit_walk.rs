//! The file side of [`super`]: paths and directories walked, each file read, progress on
//! stderr.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Accumulator, AuditOptions, Judge, Report, audit_reader};

/// Audits files and directories (recursively, entries in name order).
pub(super) fn audit_paths(paths: &[PathBuf], judge: &dyn Judge, options: &AuditOptions) -> Report {
    let mut acc = Accumulator::new(options.max_groups);
    let mut progress = Progress::new(options.progress);
    for path in paths {
        // The paths given are followed even when they are symbolic links.
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => walk(path, judge, &mut acc, &mut progress),
            Ok(_) => audit_file(path, judge, &mut acc, &mut progress),
            Err(e) => acc.skip(&path.display().to_string(), format!("cannot read: {e}")),
        }
    }
    progress.done(&acc);
    acc.finish()
}

fn walk(dir: &Path, judge: &dyn Judge, acc: &mut Accumulator, progress: &mut Progress) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return acc.skip(
                &dir.display().to_string(),
                format!("cannot read directory: {e}"),
            );
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => paths.push(entry.path()),
            Err(e) => acc.skip(
                &dir.display().to_string(),
                format!("cannot read directory: {e}"),
            ),
        }
    }
    paths.sort();
    for path in paths {
        // Symbolic links to files are followed, to directories not (no loops).
        match (std::fs::symlink_metadata(&path), std::fs::metadata(&path)) {
            (Ok(link), _) if link.is_dir() => walk(&path, judge, acc, progress),
            (_, Ok(m)) if m.is_dir() => {}
            (_, Ok(m)) if m.is_file() => {
                if is_digest(&path) {
                    acc.report.digest_files += 1;
                } else {
                    audit_file(&path, judge, acc, progress);
                }
            }
            (_, Ok(_)) => {}
            (_, Err(e)) => acc.skip(&path.display().to_string(), format!("cannot read: {e}")),
        }
    }
}

/// CloudTrail digest files ("CloudTrail digest file structure", CloudTrail User Guide) are named
/// `<account>_CloudTrail-Digest_<region>_...json.gz` and hold hashes, not events.
fn is_digest(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("_CloudTrail-Digest_"))
}

fn audit_file(path: &Path, judge: &dyn Judge, acc: &mut Accumulator, progress: &mut Progress) {
    let name = path.display().to_string();
    match File::open(path) {
        Ok(file) => audit_reader(&name, file, judge, acc),
        Err(e) => acc.skip(&name, format!("cannot open: {e}")),
    }
    progress.tick(acc);
}

/// At most one progress line a second, on stderr.
struct Progress {
    enabled: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            started: Instant::now(),
            last: None,
        }
    }

    fn tick(&mut self, acc: &Accumulator) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(now);
        // Not eprint!: it panics when stderr is a closed pipe.
        let _ = write!(std::io::stderr(), "\r{}", self.line(acc));
    }

    fn done(&self, acc: &Accumulator) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(std::io::stderr(), "\r{}", self.line(acc));
        }
    }

    fn line(&self, acc: &Accumulator) -> String {
        let r = &acc.report;
        format!(
            "credlock audit: {} files, {} records, {} groups, {} skipped, {:.0?}",
            r.files_read,
            r.records_read,
            acc.groups(),
            r.skipped.len(),
            self.started.elapsed()
        )
    }
}
