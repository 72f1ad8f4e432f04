//! The driver of `benches/audit.sh`: runs the `credlock audit` engine (src/audit.rs) over a
//! corpus written by tests/support/cloudtrail_corpus.py, with the generator's environment as
//! the judge, prints events per second, and checks both lists and the counters against the
//! generator's answers.
//!
//!   audit_bench --answers answers.json [--max-groups N] PATH...
//!
//! Exit status: 0 when the report equals the answers, 1 when it differs, 2 on usage errors.

#[cfg(feature = "daemon")]
fn main() {
    std::process::exit(bench::run());
}

#[cfg(not(feature = "daemon"))]
fn main() {
    eprintln!("audit_bench needs the daemon feature");
    std::process::exit(2);
}

#[cfg(feature = "daemon")]
mod bench {
    use std::path::PathBuf;
    use std::time::Instant;

    use credlock::audit::{AuditOptions, Call, audit_paths};
    use ipnet::IpNet;
    use serde_json::Value;

    pub fn run() -> i32 {
        let mut answers_path = None;
        let mut options = AuditOptions::default();
        let mut paths = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--answers" => answers_path = args.next(),
                "--max-groups" => match args.next().and_then(|n| n.parse().ok()) {
                    Some(n) => options.max_groups = n,
                    None => return usage(),
                },
                "--progress" => options.progress = true,
                _ if arg.starts_with("--") => return usage(),
                _ => paths.push(PathBuf::from(arg)),
            }
        }
        let Some(answers_path) = answers_path else {
            return usage();
        };
        if paths.is_empty() {
            return usage();
        }
        let answers: Value = match std::fs::read(&answers_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("cannot read {answers_path}: {e}");
                return 2;
            }
        };
        let Some(judge) = environment_judge(&answers) else {
            eprintln!("{answers_path} has no usable environment");
            return 2;
        };

        let started = Instant::now();
        let mut report = audit_paths(&paths, &judge, &options);
        let seconds = started.elapsed().as_secs_f64();

        println!("files read          {}", report.files_read);
        println!("files skipped       {}", report.skipped.len());
        println!("records read        {}", report.records_read);
        println!(
            "groups              {} denied_locked, {} would_deny; {} evicted ({} events)",
            report.denied_locked.len(),
            report.would_deny.len(),
            report.dropped_groups,
            report.dropped_events
        );
        println!("elapsed             {seconds:.2} s");
        println!(
            "events per second   {:.0}",
            report.records_read as f64 / seconds.max(1e-9)
        );

        // The lists apart: a JSON copy of 200,000 groups would dwarf the engine's own memory.
        let denied = std::mem::take(&mut report.denied_locked);
        let would = std::mem::take(&mut report.would_deny);
        let lists = answers["lists_in_answers"] != Value::Bool(false);
        let got = serde_json::to_value(&report).unwrap_or(Value::Null);
        let mut differs = Vec::new();
        let mut counters = vec![
            "files_read",
            "digest_files",
            "records_read",
            "records_denied_locked",
            "records_locked_other",
            "records_would_deny",
            "records_native_allowed",
            "records_ignored",
            "records_cross_account",
        ];
        if lists {
            counters.extend(["dropped_groups", "dropped_events"]);
            for (key, list) in [("denied_locked", &denied), ("would_deny", &would)] {
                if serde_json::to_value(list).ok().as_ref() != Some(&answers[key]) {
                    differs.push(key);
                }
            }
        }
        for key in counters {
            if got[key] != answers[key] {
                differs.push(key);
            }
        }
        // With or without evictions: every event is in a group or counted as dropped.
        let kept = |list: &[credlock::audit::Group]| list.iter().map(|g| g.count).sum::<u64>();
        if kept(&denied) + report.dropped.denied_locked.events != report.records_denied_locked
            || kept(&would) + report.dropped.would_deny.events != report.records_would_deny
        {
            differs.push("kept + dropped events");
        }
        let mut skipped: Vec<Value> = report
            .skipped
            .iter()
            .map(|s| Value::from(s.path.as_str()))
            .collect();
        skipped.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        if Value::from(skipped) != answers["skipped"] {
            differs.push("skipped");
        }
        match (differs.is_empty(), lists) {
            (true, true) => {
                println!(
                    "answers             exact match (both lists, every counter, skipped files)"
                );
                0
            }
            (true, false) => {
                println!(
                    "answers             every counter and skipped file match; kept + dropped = \
                     events in both lists (the lists themselves are not in the answers)"
                );
                0
            }
            (false, _) => {
                println!("answers             DIFFER: {}", differs.join(", "));
                1
            }
        }
    }

    fn usage() -> i32 {
        eprintln!("usage: audit_bench --answers FILE [--max-groups N] [--progress] PATH...");
        2
    }

    /// The generator's rule: via an AWS service, through one of its VPC endpoints, or (no
    /// endpoint) from an address in its CIDRs is allowed.
    fn environment_judge(answers: &Value) -> Option<impl Fn(&Call<'_>) -> Option<String> + use<>> {
        let env = &answers["environment"];
        let cidrs: Vec<IpNet> = env["cidrs"]
            .as_array()?
            .iter()
            .filter_map(|c| c.as_str()?.parse().ok())
            .collect();
        let vpces: Vec<String> = env["vpc_endpoints"]
            .as_array()?
            .iter()
            .filter_map(|v| Some(v.as_str()?.to_string()))
            .collect();
        Some(move |call: &Call<'_>| {
            if call.via_aws_service {
                return None;
            }
            let source = match (call.vpc_endpoint_id, call.source_ip) {
                (Some(vpce), _) if vpces.iter().any(|v| v == vpce) => return None,
                (Some(vpce), _) => vpce.to_string(),
                (None, Some(ip)) if cidrs.iter().any(|c| c.contains(&ip)) => return None,
                (None, Some(ip)) => ip.to_string(),
                (None, None) => "nowhere".to_string(),
            };
            Some(format!(
                "{} from {source} is outside the environment of {}",
                call.action, call.instance_id
            ))
        })
    }
}
