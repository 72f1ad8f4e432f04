//! `fleet-sim`: the fleet simulation of issue 17 (engine: `sim.rs`).
//!
//! ```sh
//! cargo bench --bench fleet-sim -- --instances 10000               # every scenario, a table
//! cargo bench --bench fleet-sim -- --scenario boot-60s --json      # one scenario, JSON
//! ```
//!
//! Flags: `--instances N` (default 10000), `--seed S` (default 1), `--scenario NAME|all`
//! (default all), `--json`, `--quota-scale F` (AWS's quotas times F, default 1), and
//! `--sdk-attempts STS,S3,EC2` (attempts per call the AWS SDK makes; default 1,1,3 as
//! production configures them). With `all`, each scenario runs in a child process of its own,
//! so its wall time and peak RSS are its own.
#![forbid(unsafe_code)]

// The tests (tests/fleet_sim.rs) use parts of the engine the CLI does not.
#[allow(dead_code)]
mod sim;

use std::process::{Command, ExitCode, Stdio};

use serde_json::{Map, Value};

struct Args {
    params: sim::Params,
    scenario: String,
    json: bool,
    details: bool,
}

/// Instances of the smoke run (`cargo test`).
const SMOKE_INSTANCES: usize = 50;

const USAGE: &str = "usage: fleet-sim [--instances N] [--seed S] [--scenario NAME|all] [--json] [--quota-scale F] [--sdk-attempts STS,S3,EC2] [--no-details]";

fn parse() -> Result<Args, String> {
    let mut args = Args {
        params: sim::Params::new(10_000, 1),
        scenario: "all".into(),
        json: false,
        details: true,
    };
    let mut it = std::env::args().skip(1);
    // `cargo test --all-targets` runs this binary with no argument at all (`cargo bench` passes
    // --bench): then a smoke run of every scenario on a few instances, so the suite proves the
    // binary works without spending minutes on the figures (10,000 instances took 18 min of
    // the CI's cargo-test). tests/fleet_sim.rs asserts the targets on 500.
    let mut smoke = true;
    while let Some(flag) = it.next() {
        smoke = false;
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--instances" => {
                let v = value("--instances")?;
                args.params.instances = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or_else(|| format!("--instances {v:?} is not a number in 1..=1000000"))?;
            }
            "--seed" => {
                let v = value("--seed")?;
                args.params.seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?} is not a number"))?;
            }
            "--scenario" => args.scenario = value("--scenario")?,
            "--quota-scale" => {
                let v = value("--quota-scale")?;
                args.params.quota_scale = v
                    .parse()
                    .ok()
                    .filter(|f: &f64| *f > 0.0 && f.is_finite())
                    .ok_or_else(|| format!("--quota-scale {v:?} is not a positive number"))?;
            }
            "--sdk-attempts" => {
                let v = value("--sdk-attempts")?;
                let n: Vec<u32> = v
                    .split(',')
                    .map(|p| p.parse().ok().filter(|n| (1..=10).contains(n)))
                    .collect::<Option<_>>()
                    .filter(|n: &Vec<u32>| n.len() == 3)
                    .ok_or_else(|| {
                        format!("--sdk-attempts {v:?} is not three numbers in 1..=10 like 1,1,3")
                    })?;
                args.params.sdk = sim::stand_ins::SdkAttempts {
                    sts: n[0],
                    s3: n[1],
                    ec2: n[2],
                };
            }
            "--json" => args.json = true,
            "--no-details" => args.details = false,
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if smoke {
        args.params.instances = SMOKE_INSTANCES;
        eprintln!(
            "fleet-sim: no arguments (cargo test): a smoke run on {SMOKE_INSTANCES} instances; the figures come from cargo bench --bench fleet-sim"
        );
    }
    if args.scenario != "all" && sim::scenario(&args.scenario).is_none() {
        let names: Vec<&str> = sim::SCENARIOS.iter().map(|s| s.name).collect();
        return Err(format!(
            "unknown scenario {:?}: one of {} or all",
            args.scenario,
            names.join(", ")
        ));
    }
    Ok(args)
}

/// Runs one scenario in a child process and reads its report back.
fn run_child(args: &Args, name: &str) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let sdk = args.params.sdk;
    let out = Command::new(exe)
        .args([
            "--scenario",
            name,
            "--json",
            "--instances",
            &args.params.instances.to_string(),
            "--seed",
            &args.params.seed.to_string(),
            "--quota-scale",
            &args.params.quota_scale.to_string(),
            "--sdk-attempts",
            &format!("{},{},{}", sdk.sts, sdk.s3, sdk.ec2),
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{name}: cannot start the child: {e}"))?;
    if !out.status.success() {
        return Err(format!("{name}: the child failed ({})", out.status));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{name}: the child's JSON: {e}"))?;
    v.get(name)
        .cloned()
        .ok_or_else(|| format!("{name}: the child's JSON has no {name:?}"))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if args.scenario != "all" {
        let Some(scenario) = sim::scenario(&args.scenario) else {
            return ExitCode::from(2);
        };
        eprintln!(
            "fleet-sim: {} with N={} (virtual {:.0} s)...",
            scenario.name, args.params.instances, scenario.run_for
        );
        let report = match sim::run(&scenario, &args.params) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fleet-sim: {}: {e}", scenario.name);
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "fleet-sim: {} done in {:.1} s wall",
            scenario.name, report.wall_s
        );
        if args.json {
            let mut o = Map::new();
            o.insert(scenario.name.into(), report.json());
            println!("{}", Value::Object(o));
        } else {
            let mut one = Map::new();
            one.insert(scenario.name.into(), report.json());
            print!("{}", sim::report::table(&one, false));
            println!();
            print!("{}", report.details());
        }
        return ExitCode::SUCCESS;
    }
    // Every scenario, each in its own process.
    let mut all = Map::new();
    for scenario in sim::SCENARIOS {
        match run_child(&args, scenario.name) {
            Ok(v) => {
                all.insert(scenario.name.into(), v);
            }
            Err(e) => {
                eprintln!("fleet-sim: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.json {
        println!("{}", Value::Object(all));
    } else {
        print!("{}", sim::report::table(&all, args.details));
    }
    ExitCode::SUCCESS
}
