//! Any upstream body: the rewrite never panics, and a body it rewrote never still holds the
//! upstream's value of a replaced field.
#![no_main]

use std::time::{Duration, SystemTime};

use credlock::credentials::{LockedCredentials, Secret, rewrite};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let locked = LockedCredentials::new(
        "ASIALOCKEDLOCKED0001".into(),
        Secret::new("locked-secret"),
        Secret::new("locked-token"),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_996_400),
    );
    if let Ok(Some(out)) = rewrite(data, &locked) {
        let v: serde_json::Value = serde_json::from_slice(&out).expect("a rewritten body is JSON");
        assert_eq!(v["AccessKeyId"], "ASIALOCKEDLOCKED0001");
        assert_eq!(v["SecretAccessKey"], "locked-secret");
        assert_eq!(v["Token"], "locked-token");
    }
});
