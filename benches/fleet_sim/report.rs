//! The numbers of one run: per-API call rates against their quotas, throttling, time to READY,
//! the longest time without a servable set, the re-lock and recovery waves; as a table and as
//! JSON.

use serde_json::{Map, Value, json};

use super::stand_ins::{Api, InstanceRecord, Quotas, Recorded, Series};
use super::{Event, Params, Scenario};

/// What the simulation hands the report.
pub struct Raw {
    pub recorded: Recorded,
    pub quotas: Quotas,
    pub sample_period: f64,
}

/// One API's (or the EC2 Describe bucket's) numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRow {
    pub name: &'static str,
    /// Over the whole run.
    pub calls: u64,
    pub throttled: u64,
    pub failed: u64,
    /// Per-second rate over the scenario's window.
    pub peak: u32,
    pub p99: u32,
    pub quota: f64,
}

/// A wave of instances that must each do something (re-lock, recover) after an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    /// When the wave began (seconds since the scenario began).
    pub from: f64,
    pub instances: usize,
    pub done: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Until the last instance was done; `None` if some never were.
    pub all: Option<f64>,
    /// The highest AssumeRole rate from `from` to the end of the run, per second.
    pub sts_peak: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub scenario: &'static str,
    pub instances: usize,
    pub seed: u64,
    pub quota_scale: f64,
    pub window: (f64, f64),
    pub apis: Vec<ApiRow>,
    /// Time to READY from each instance's start: p50, p99, max (`None`: beyond the run).
    pub ready: [Option<f64>; 3],
    pub not_ready: usize,
    /// When the last instance became READY (seconds since the scenario began).
    pub all_ready_at: Option<f64>,
    /// The longest time any instance had no servable set after its first.
    pub max_unserved: f64,
    pub stopped_while_valid: u64,
    pub sample_period: f64,
    pub retries_after_failure: u64,
    pub early_retries: u64,
    pub late_retries: u64,
    /// Waits after a first throttled AssumeRole: how many, their mean, and the share in the
    /// lower half of the back-off window (full jitter: about half).
    pub first_retry: (usize, Option<f64>, Option<f64>),
    pub relock: Option<Wave>,
    pub recovery: Option<Wave>,
    pub wall_s: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn per_second(v: &[u32], (from, to): (f64, f64)) -> Vec<u32> {
    (from as usize..to as usize)
        .map(|s| v.get(s).copied().unwrap_or(0))
        .collect()
}

fn sum(v: &[u32]) -> u64 {
    v.iter().map(|&n| u64::from(n)).sum()
}

fn add(a: &[u32], b: &[u32]) -> Vec<u32> {
    (0..a.len().max(b.len()))
        .map(|i| a.get(i).copied().unwrap_or(0) + b.get(i).copied().unwrap_or(0))
        .collect()
}

fn row(name: &'static str, s: &Series, quota: f64, window: (f64, f64)) -> ApiRow {
    let mut rates = per_second(&s.calls, window);
    rates.sort_unstable();
    let sorted: Vec<f64> = rates.iter().map(|&n| f64::from(n)).collect();
    ApiRow {
        name,
        calls: sum(&s.calls),
        throttled: sum(&s.throttled),
        failed: sum(&s.failed),
        peak: rates.last().copied().unwrap_or(0),
        p99: percentile(&sorted, 0.99).unwrap_or(0.0) as u32,
        quota,
    }
}

fn wave(
    (instances, sts, end): (&[InstanceRecord], &Series, f64),
    from: f64,
    member: impl Fn(&InstanceRecord) -> bool,
    done: impl Fn(&InstanceRecord) -> Option<f64>,
) -> Wave {
    let members: Vec<&InstanceRecord> = instances.iter().filter(|r| member(r)).collect();
    let mut times: Vec<f64> = members
        .iter()
        .filter_map(|r| done(r))
        .map(|t| t - from)
        .collect();
    times.sort_by(f64::total_cmp);
    let all = (times.len() == members.len()).then(|| times.last().copied().unwrap_or(0.0));
    Wave {
        from,
        instances: members.len(),
        done: times.len(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        all,
        sts_peak: per_second(&sts.calls, (from, end))
            .into_iter()
            .max()
            .unwrap_or(0),
    }
}

impl Report {
    pub fn new(
        scenario: &Scenario,
        params: &Params,
        raw: Raw,
        wall_s: f64,
        peak_rss_mb: Option<f64>,
    ) -> Report {
        let r = &raw.recorded;
        let window = scenario.window;
        let mut apis = Vec::new();
        for api in [Api::AssumeRole, Api::GetObject] {
            apis.push(row(
                api.name(),
                &r.series[api.index()],
                raw.quotas.rate(api),
                window,
            ));
        }
        // The four Describe calls share one bucket: their sum is what the quota meters.
        let mut describe = Series::default();
        let ec2: Vec<(Api, &Series)> = Api::ALL
            .iter()
            .zip(&r.series)
            .filter(|(a, _)| Api::EC2_DISCOVERY.contains(a))
            .map(|(a, s)| (*a, s))
            .collect();
        for (_, s) in &ec2 {
            describe.calls = add(&describe.calls, &s.calls);
            describe.throttled = add(&describe.throttled, &s.throttled);
            describe.failed = add(&describe.failed, &s.failed);
        }
        let ec2_rate = raw.quotas.rate(Api::DescribeVpcs);
        apis.push(row("ec2:Describe*", &describe, ec2_rate, window));
        for (api, s) in ec2 {
            apis.push(row(api.name(), s, ec2_rate, window));
        }

        let instances = &r.instances;
        let mut ready: Vec<f64> = instances
            .iter()
            .filter_map(|i| Some(i.ready? - i.started?))
            .collect();
        ready.sort_by(f64::total_cmp);
        let not_ready = instances.len() - ready.len();
        // An instance never READY counts as slower than every READY one.
        let with_missing = |p: f64| {
            let rank = ((p * instances.len() as f64).ceil() as usize).max(1);
            ready.get(rank - 1).copied()
        };
        let all_ready_at =
            (not_ready == 0).then(|| instances.iter().filter_map(|i| i.ready).fold(0.0, f64::max));

        let mut waits = r.first_retry_waits.clone();
        waits.sort_by(f64::total_cmp);
        let mean = (!waits.is_empty()).then(|| waits.iter().sum::<f64>() / waits.len() as f64);
        // The first back-off window is [0.1 s, 1 s]: its lower half ends at 0.55 s.
        let lower = (!waits.is_empty())
            .then(|| waits.iter().filter(|&&w| w < 0.55).count() as f64 / waits.len() as f64);

        let sts = &r.series[Api::AssumeRole.index()];
        let relock = match scenario.event {
            Event::AddAddress { at } | Event::RemoveAddress { at } => Some(wave(
                (instances, sts, scenario.run_for),
                at,
                |i| i.started.is_some_and(|s| s < at),
                |i| i.relocked,
            )),
            _ => None,
        };
        let recovery = match scenario.event {
            Event::StsOutage { to, .. } => Some(wave(
                (instances, sts, scenario.run_for),
                to,
                |i| i.outage_failed,
                |i| i.recovered,
            )),
            _ => None,
        };
        Report {
            scenario: scenario.name,
            instances: params.instances,
            seed: params.seed,
            quota_scale: params.quota_scale,
            window,
            apis,
            ready: [with_missing(0.5), with_missing(0.99), with_missing(1.0)],
            not_ready,
            all_ready_at,
            max_unserved: instances
                .iter()
                .map(|i| i.longest_unserved)
                .fold(0.0, f64::max),
            stopped_while_valid: instances
                .iter()
                .map(|i| u64::from(i.stopped_while_valid))
                .sum(),
            sample_period: raw.sample_period,
            retries_after_failure: r.retries_after_failure,
            early_retries: r.early_retries,
            late_retries: r.late_retries,
            first_retry: (waits.len(), mean, lower),
            relock,
            recovery,
            wall_s,
            peak_rss_mb,
        }
    }

    pub fn api(&self, name: &str) -> Option<&ApiRow> {
        self.apis.iter().find(|a| a.name == name)
    }

    /// Throttled calls of every API together.
    pub fn throttled(&self) -> u64 {
        self.apis
            .iter()
            .filter(|a| a.name != "ec2:Describe*")
            .map(|a| a.throttled)
            .sum()
    }

    /// The numbers that depend on the seed only (not wall time or memory).
    pub fn deterministic_json(&self) -> Value {
        let mut v = self.json();
        if let Some(o) = v.as_object_mut() {
            o.remove("wall_s");
            o.remove("peak_rss_mb");
        }
        v
    }

    pub fn json(&self) -> Value {
        let map = |f: &dyn Fn(&ApiRow) -> Value| -> Value {
            Value::Object(
                self.apis
                    .iter()
                    .map(|a| (a.name.to_string(), f(a)))
                    .collect::<Map<String, Value>>(),
            )
        };
        let wave = |w: &Option<Wave>| match w {
            None => Value::Null,
            Some(w) => json!({
                "from_s": w.from,
                "instances": w.instances,
                "done": w.done,
                "p50_s": w.p50.map(ms),
                "p99_s": w.p99.map(ms),
                "all_s": w.all.map(ms),
                "sts_peak_rps": w.sts_peak,
            }),
        };
        json!({
            "instances": self.instances,
            "seed": self.seed,
            "quota_scale": self.quota_scale,
            "window_s": [self.window.0, self.window.1],
            "peak_rps": map(&|a| json!(a.peak)),
            "p99_rps": map(&|a| json!(a.p99)),
            "quota_rps": map(&|a| json!(a.quota)),
            "calls": map(&|a| json!(a.calls)),
            "throttled": map(&|a| json!(a.throttled)),
            "failed": map(&|a| json!(a.failed)),
            "ready_p50_s": self.ready[0].map(ms),
            "ready_p99_s": self.ready[1].map(ms),
            "ready_max_s": self.ready[2].map(ms),
            "not_ready": self.not_ready,
            "all_ready_at_s": self.all_ready_at.map(ms),
            "max_unserved_s": ms(self.max_unserved),
            "stopped_while_valid": self.stopped_while_valid,
            "sample_period_s": ms(self.sample_period),
            "retries_after_failure": self.retries_after_failure,
            "early_retries": self.early_retries,
            "late_retries": self.late_retries,
            "first_retry_waits": self.first_retry.0,
            "first_retry_wait_mean_s": self.first_retry.1.map(ms),
            "first_retry_lower_half": self.first_retry.2.map(ms),
            "relock": wave(&self.relock),
            "recovery": wave(&self.recovery),
            "wall_s": ms(self.wall_s),
            "peak_rss_mb": self.peak_rss_mb.map(|m| m.round()),
        })
    }

    /// The detail block of one scenario.
    pub fn details(&self) -> String {
        let mut out = format!(
            "{}: N={} seed={} quotas x{} | rates over {}-{} s, counts over the whole run\n",
            self.scenario,
            self.instances,
            self.seed,
            self.quota_scale,
            self.window.0,
            self.window.1
        );
        out.push_str(&format!(
            "  {:<26} {:>10} {:>7} {:>7} {:>8} {:>10} {:>8}\n",
            "API", "calls", "peak/s", "p99/s", "quota/s", "throttled", "failed"
        ));
        for a in &self.apis {
            if a.calls == 0 && a.name.starts_with("ec2:D") && a.name != "ec2:Describe*" {
                continue;
            }
            out.push_str(&format!(
                "  {:<26} {:>10} {:>7} {:>7} {:>8} {:>10} {:>8}\n",
                a.name, a.calls, a.peak, a.p99, a.quota, a.throttled, a.failed
            ));
        }
        out.push_str(&format!(
            "  READY p50 {} p99 {} max {} (not READY at the end: {}; last READY at {})\n",
            secs(self.ready[0]),
            secs(self.ready[1]),
            secs(self.ready[2]),
            self.not_ready,
            secs(self.all_ready_at),
        ));
        out.push_str(&format!(
            "  longest without a servable set after the first: {:.1} s; stopped serving a valid set: {} (sampled every {:.0} s)\n",
            self.max_unserved, self.stopped_while_valid, self.sample_period
        ));
        out.push_str(&format!(
            "  AssumeRole retries after a failure: {} (sooner than the 0.1 s floor: {}, later than the ceiling: {}); first-retry waits: {}, mean {}, lower half {}\n",
            self.retries_after_failure,
            self.early_retries,
            self.late_retries,
            self.first_retry.0,
            secs(self.first_retry.1),
            self.first_retry.2.map_or("-".into(), |f| format!("{:.0} %", f * 100.0)),
        ));
        for (what, w) in [("re-lock", &self.relock), ("recovery", &self.recovery)] {
            if let Some(w) = w {
                out.push_str(&format!(
                    "  {what} after {:.0} s: {}/{} instances, p50 {} p99 {} all {}; AssumeRole peak from then on {}/s\n",
                    w.from,
                    w.done,
                    w.instances,
                    secs(w.p50),
                    secs(w.p99),
                    secs(w.all),
                    w.sts_peak
                ));
            }
        }
        out.push_str(&format!(
            "  wall {:.1} s, peak RSS {}\n",
            self.wall_s,
            self.peak_rss_mb
                .map_or("-".into(), |m| format!("{m:.0} MB"))
        ));
        out
    }
}

fn ms(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.2} s"))
}

/// The table of every scenario from the children's JSON.
pub fn table(all: &Map<String, Value>, details: bool) -> String {
    let num = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut v = v;
        for p in path {
            v = v.get(p)?;
        }
        v.as_f64()
    };
    let Some(first) = all.values().next() else {
        return String::new();
    };
    let mut out = format!(
        "N={} seed={} | quotas/s: STS {}, S3 {}, EC2 Describe* {} | rates peak/p99 per second over each scenario's window; throttled over the whole run\n",
        num(first, &["instances"]).unwrap_or(0.0),
        num(first, &["seed"]).unwrap_or(0.0),
        num(first, &["quota_rps", "sts:AssumeRole"]).unwrap_or(0.0),
        num(first, &["quota_rps", "s3:GetObject"]).unwrap_or(0.0),
        num(first, &["quota_rps", "ec2:Describe*"]).unwrap_or(0.0),
    );
    out.push_str(&format!(
        "| {:<13} | {:>9} | {:>9} | {:>9} | {:>15} | {:>19} | {:>8} | {:>15} | {:>6} | {:>6} |\n",
        "scenario",
        "STS",
        "S3",
        "EC2",
        "throttled S/3/E",
        "READY p50/p99/max s",
        "unserved",
        "wave done/all s",
        "wall s",
        "RSS MB"
    ));
    out.push_str(&format!(
        "|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|\n",
        "-".repeat(15),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(17),
        "-".repeat(21),
        "-".repeat(10),
        "-".repeat(17),
        "-".repeat(8),
        "-".repeat(8)
    ));
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |x| format!("{x:.digits$}"));
    for (name, v) in all {
        let rate = |api: &str| {
            format!(
                "{}/{}",
                num(v, &["peak_rps", api]).unwrap_or(0.0),
                num(v, &["p99_rps", api]).unwrap_or(0.0)
            )
        };
        let thr = |api: &str| num(v, &["throttled", api]).unwrap_or(0.0);
        let wave = ["relock", "recovery"]
            .iter()
            .find_map(|k| v.get(*k).filter(|w| !w.is_null()))
            .map_or("-".into(), |w| {
                format!(
                    "{}/{} {}",
                    num(w, &["done"]).unwrap_or(0.0),
                    num(w, &["instances"]).unwrap_or(0.0),
                    opt(num(w, &["all_s"]), 0)
                )
            });
        out.push_str(&format!(
            "| {:<13} | {:>9} | {:>9} | {:>9} | {:>15} | {:>19} | {:>8} | {:>15} | {:>6} | {:>6} |\n",
            name,
            rate("sts:AssumeRole"),
            rate("s3:GetObject"),
            rate("ec2:Describe*"),
            format!(
                "{}/{}/{}",
                thr("sts:AssumeRole"),
                thr("s3:GetObject"),
                thr("ec2:Describe*")
            ),
            format!(
                "{}/{}/{}",
                opt(num(v, &["ready_p50_s"]), 2),
                opt(num(v, &["ready_p99_s"]), 2),
                opt(num(v, &["ready_max_s"]), 2)
            ),
            format!("{} s", opt(num(v, &["max_unserved_s"]), 0)),
            wave,
            opt(num(v, &["wall_s"]), 1),
            opt(num(v, &["peak_rss_mb"]), 0),
        ));
    }
    if details {
        out.push('\n');
        for (name, v) in all {
            out.push_str(&format!(
                "{name}: not READY {}, last READY at {} s, early/late retries {}/{}, first-retry waits {} (mean {} s, lower half {}), stopped serving a valid set {}; calls sts {} s3 {} ec2 {}; failed sts {}\n",
                num(v, &["not_ready"]).unwrap_or(0.0),
                opt(num(v, &["all_ready_at_s"]), 1),
                num(v, &["early_retries"]).unwrap_or(0.0),
                num(v, &["late_retries"]).unwrap_or(0.0),
                num(v, &["first_retry_waits"]).unwrap_or(0.0),
                opt(num(v, &["first_retry_wait_mean_s"]), 2),
                opt(num(v, &["first_retry_lower_half"]), 2),
                num(v, &["stopped_while_valid"]).unwrap_or(0.0),
                num(v, &["calls", "sts:AssumeRole"]).unwrap_or(0.0),
                num(v, &["calls", "s3:GetObject"]).unwrap_or(0.0),
                num(v, &["calls", "ec2:Describe*"]).unwrap_or(0.0),
                num(v, &["failed", "sts:AssumeRole"]).unwrap_or(0.0),
            ));
            for kind in ["relock", "recovery"] {
                if let Some(w) = v.get(kind).filter(|w| !w.is_null()) {
                    out.push_str(&format!(
                        "{name}: {kind} from {} s: {}/{} instances, p50 {} s, p99 {} s, all {} s; AssumeRole peak from then on {}/s\n",
                        num(w, &["from_s"]).unwrap_or(0.0),
                        num(w, &["done"]).unwrap_or(0.0),
                        num(w, &["instances"]).unwrap_or(0.0),
                        opt(num(w, &["p50_s"]), 1),
                        opt(num(w, &["p99_s"]), 1),
                        opt(num(w, &["all_s"]), 1),
                        num(w, &["sts_peak_rps"]).unwrap_or(0.0),
                    ));
                }
            }
        }
    }
    out
}
