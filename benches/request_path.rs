//! Micro-benchmarks of the request-path pieces: classification, the credential body rewrite,
//! and session-policy rendering (off the request path, but on every lock).

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use credlock::credentials::{LockedCredentials, Secret, rewrite};
use credlock::environment::Environment;
use credlock::identity::RoleArn;
use credlock::policy;
use credlock::route::classify;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;

const BODY: &str = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2026-11-23T09:08:52Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIAV2476QF6ZLXMM8YT\",\n  \"SecretAccessKey\" : \"imdsV2SecretvaglInxO58rmjmbFTMf4V9JbGDVq\",\n  \"Token\" : \"IMDSV2TokenLPh+FsZzZJ1uosMOiZWYY9h7vWf//3eikSukLEAxYsEht5dcaqzzbP4guBP8nBXnV5BMzuMgkftmXJSVMkhJStLfN1hNK3fcqdlmkhQH2S8jfFSEfF7QxxYyEi8xaP2d/NTZKtRtmxFBs1V/XFcXDtj9lHPBEGYsOnpau52z46+zm/JQQpb4U3SEFzozxm7PzrAtIMDSV2TokenLPh+FsZzZJ1uosMOiZWYY9h7vWf//3eikSukLEAxYsEht5dcaqzzbP4guBP8nBXnV5BMzuMgkftm\",\n  \"Expiration\" : \"2026-11-23T15:08:52Z\"\n}";

fn classification(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for (name, target) in [
        ("passthrough", "/latest/meta-data/instance-id"),
        (
            "credentials",
            "/latest/meta-data/iam/security-credentials/credlock-test-role",
        ),
        ("token", "/latest/api/token"),
        ("refused", "/latest/meta-data/%69am/security-credentials/x"),
    ] {
        let method = if name == "token" {
            Method::PUT
        } else {
            Method::GET
        };
        g.bench_function(name, |b| {
            b.iter(|| classify(black_box(&method), black_box(target)))
        });
    }
    g.finish();
}

fn credential_rewrite(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)] // a benchmark input, not credlock's time
    let now = SystemTime::now();
    let locked = LockedCredentials::new(
        "ASIARZPUZDIKLXLEJEW4".into(),
        Secret::new("BSmdk16wrYw43MAN7nyfB5yhj9noo/6sDCOb5ylQ"),
        Secret::new(
            "FQoGZXIvYXdzEBYaD1c44Fgyu2Y7oRr+GGv/txYyMVx/V7+bA8WkrCp/Q1uoXEa6noXDnPhqu7nmqoqkU4hhbA3QOk/zkfuHIraWD/5BkfrHxSxrZC0gs0j/i1UJLxTVsuO+IlEef60D8J3TAkzgNwiAdg+Jd6TXO3nIHfJHX0PuAbK9KW1ltStk",
        ),
        now + Duration::from_secs(3600),
        now,
    );
    c.bench_function("rewrite", |b| {
        b.iter(|| rewrite(black_box(BODY.as_bytes()), &locked))
    });
}

fn policy_rendering(c: &mut Criterion) {
    let template = policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap();
    let mut env = Environment::default();
    for ip in [
        "203.0.113.10",
        "203.0.113.20",
        "198.51.100.0/24",
        "2001:db8:1::10",
    ] {
        env.add_ip(ip);
    }
    env.vpcs.insert("vpc-0abc1234def567890".into());
    env.vpc_endpoints.insert("vpce-0123456789abcdef0".into());
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
    c.bench_function("render_policy", |b| {
        b.iter(|| policy::render(&template, black_box(&env), &role))
    });
}

criterion_group!(
    benches,
    classification,
    credential_rewrite,
    policy_rendering
);
criterion_main!(benches);
