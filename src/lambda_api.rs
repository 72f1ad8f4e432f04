//! The Lambda Extensions API client of [`crate::lambda`]: Register, Next and the error reports
//! ("Lambda Extensions API", AWS Lambda Developer Guide).

use std::time::Duration;

use super::{API, Event, parse_event};

/// The Extensions API client ("Lambda Extensions API", "Extensions API reference").
pub struct ExtensionsApi {
    http: reqwest::Client,
    base: String,
    id: String,
}

/// An answer other than success: the status and the API's own error text.
async fn api_error(what: &str, response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let body: String = body.trim().chars().take(300).collect();
    format!("{what}: the Extensions API answered {status}: {body}")
}

impl ExtensionsApi {
    /// Registers for INVOKE and SHUTDOWN under `name` (the extension's file name).
    pub async fn register(runtime_api: &str, name: &str) -> Result<ExtensionsApi, String> {
        // No client-wide time-out: Next blocks for as long as the environment is idle
        // ("Do not set a timeout on the GET call").
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let base = format!("http://{runtime_api}{API}");
        let response = http
            .post(format!("{base}/register"))
            .header("Lambda-Extension-Name", name)
            .timeout(Duration::from_secs(10))
            .json(&serde_json::json!({"events": ["INVOKE", "SHUTDOWN"]}))
            .send()
            .await
            .map_err(|e| format!("register: {e}"))?;
        if !response.status().is_success() {
            return Err(api_error("register", response).await);
        }
        let id = response
            .headers()
            .get("Lambda-Extension-Identifier")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or("register: no Lambda-Extension-Identifier in the answer")?
            .to_string();
        Ok(ExtensionsApi { http, base, id })
    }

    pub async fn next(&self) -> Result<Event, String> {
        let response = self
            .http
            .get(format!("{}/event/next", self.base))
            .header("Lambda-Extension-Identifier", &self.id)
            .send()
            .await
            .map_err(|e| format!("event/next: {e}"))?;
        if !response.status().is_success() {
            return Err(api_error("event/next", response).await);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("event/next: {e}"))?;
        parse_event(&body)
    }

    /// `init/error` or `exit/error` with `error_type` and a message (which never holds a
    /// secret: STS's and credlock's own words).
    pub async fn report(&self, kind: &str, error_type: &str, message: &str) {
        let result = self
            .http
            .post(format!("{}/{kind}/error", self.base))
            .header("Lambda-Extension-Identifier", &self.id)
            .header("Lambda-Extension-Function-Error-Type", error_type)
            .timeout(Duration::from_secs(5))
            .json(&serde_json::json!({"errorMessage": message, "errorType": error_type}))
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!("credlock: {}", api_error(kind, r).await),
            Err(e) => eprintln!("credlock: {kind}/error: {e}"),
        }
    }
}
