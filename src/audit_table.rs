//! The readable form of a [`Report`]: two tables and a summary.

use std::fmt::Write;

use super::{Group, Report};

/// The report as text: the two lists as aligned tables (the advice of a `would_deny` group on
/// the line under it), then what was read, skipped and dropped.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    section(
        &mut out,
        "Denied by the lock (credlock sessions; theft signals)",
        &report.denied_locked,
        report.records_denied_locked,
    );
    if report
        .denied_locked
        .iter()
        .any(|g| g.event_source.starts_with("ec2."))
    {
        out.push_str(
            "  EC2 denials (Client.UnauthorizedOperation) carry an encoded message and are counted \
             whichever policy denied them; decode one with `aws sts decode-authorization-message`.\n",
        );
    }
    out.push('\n');
    section(
        &mut out,
        "Would be denied (native instance-profile sessions; before rolling out)",
        &report.would_deny,
        report.records_would_deny,
    );
    out.push('\n');
    let r = report;
    let _ = writeln!(
        out,
        "Read {} ({} not read): {} records; {} denied by the lock, {} other \
         calls of credlock sessions, {} of native sessions would be denied, {} would pass, {} \
         ignored (other principals).",
        count(r.files_read, "file"),
        count(r.digest_files, "digest file"),
        r.records_read,
        r.records_denied_locked,
        r.records_locked_other,
        r.records_would_deny,
        r.records_native_allowed,
        r.records_ignored
    );
    if r.records_cross_account > 0 {
        let _ = writeln!(
            out,
            "{} grouped records were delivered to another account than the caller's (with an \
             organization trail, such a call may be counted once per account).",
            r.records_cross_account
        );
    }
    if r.dropped_groups > 0 {
        let _ = writeln!(
            out,
            "Group limit reached: {} groups ({} events) evicted ({} groups / {} events from the \
             denied list); raise the limit to see them.",
            r.dropped_groups,
            r.dropped_events,
            r.dropped.denied_locked.groups,
            r.dropped.denied_locked.events
        );
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(
            out,
            "Skipped {} (records read before the failure are counted):",
            count(r.skipped.len() as u64, "file")
        );
        for s in &r.skipped {
            let _ = writeln!(out, "  {}: {}", s.path, s.reason);
        }
    }
    out
}

fn section(out: &mut String, title: &str, groups: &[Group], events: u64) {
    if groups.is_empty() {
        let _ = writeln!(out, "{title}: none");
        return;
    }
    let _ = writeln!(
        out,
        "{title}: {} in {}",
        count(events, "call"),
        count(groups.len() as u64, "group")
    );
    let rows: Vec<[String; 7]> = groups
        .iter()
        .map(|g| {
            [
                g.count.to_string(),
                g.instance_id.clone(),
                g.source.to_string(),
                g.event_source
                    .strip_suffix(".amazonaws.com")
                    .unwrap_or(&g.event_source)
                    .to_string(),
                g.event_name.clone(),
                g.first_seen.clone(),
                g.last_seen.clone(),
            ]
        })
        .collect();
    let header = [
        "COUNT",
        "INSTANCE",
        "SOURCE",
        "SERVICE",
        "EVENT",
        "FIRST SEEN",
        "LAST SEEN",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    line(out, &header.map(String::from), &widths);
    for (row, group) in rows.iter().zip(groups) {
        line(out, row, &widths);
        if let Some(advice) = &group.advice {
            let _ = writeln!(out, "{:>w$}  -> {advice}", "", w = widths[0]);
        }
    }
}

fn line(out: &mut String, cells: &[String; 7], widths: &[usize; 7]) {
    let mut text = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        if i == 0 {
            let _ = write!(text, "{cell:>w$}");
        } else {
            let _ = write!(text, "  {cell:<w$}");
        }
    }
    let _ = writeln!(out, "{}", text.trim_end());
}

/// "1 file", "2 files".
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
