//! Any request line: classification never panics, and whatever it forwards as passthrough is
//! exactly what was asked and never names the credential subtree under any spelling a lenient
//! server could decode.
#![no_main]

use credlock::route::{Route, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (method_byte, rest) = match data.split_first() {
        Some(x) => x,
        None => return,
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let method = match method_byte % 4 {
        0 => http::Method::GET,
        1 => http::Method::HEAD,
        2 => http::Method::PUT,
        _ => http::Method::POST,
    };
    match classify(&method, target) {
        Route::Passthrough { target: forwarded } => {
            // Exactly what was asked (an absolute-form target with no path asks for "/").
            assert!(target.ends_with(forwarded) || forwarded == "/");
            let lower = forwarded.to_ascii_lowercase();
            let (path, query) = lower.split_once('?').unwrap_or((&lower, ""));
            assert!(!query.contains('/') && !query.contains("credentials"));
            // A forwarded target contains no byte a server could decode into something else.
            assert!(!lower.contains('%') && !lower.contains('\\') && !lower.contains(';'));
            assert!(!path.contains("//"));
            // Only the identity-role tree may mention credentials on its way through.
            if path.contains("credentials") {
                assert!(
                    path.contains("/meta-data/identity-credentials"),
                    "{forwarded}"
                );
            }
        }
        Route::Credentials { path, role, .. } => {
            assert!(target.contains(path));
            assert!(!role.is_empty() && !role.contains('/'));
        }
        Route::Token | Route::RoleListing { .. } | Route::Refused(_) => {}
    }
});
