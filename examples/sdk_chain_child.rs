//! The AWS Rust SDK's default credential chain in a child process, for tests that give it an
//! environment the way an application receives one (tests/e2e/test_credentials_cli.py: a
//! profile whose `credential_process` is `credlock credentials`). `aws_config::defaults` reads
//! `AWS_CONFIG_FILE`, `AWS_PROFILE` and `AWS_ENDPOINT_URL_STS` from the process environment
//! only, hence a child. It resolves credentials through the chain, signs STS
//! GetCallerIdentity with them, and prints one `SDK-CHAIN-REPORT {json}` line: the access key
//! id, the expiry, the caller ARN (or the STS error), never the secret.

use std::time::UNIX_EPOCH;

use aws_credential_types::provider::ProvideCredentials;
use serde_json::json;

const REPORT: &str = "SDK-CHAIN-REPORT ";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let Some(provider) = sdk.credentials_provider() else {
        eprintln!("sdk_chain_child: the default chain has no credentials provider");
        std::process::exit(1);
    };
    let creds = match provider.provide_credentials().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "sdk_chain_child: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            );
            std::process::exit(1);
        }
    };
    let (arn, sts_error) = match aws_sdk_sts::Client::new(&sdk)
        .get_caller_identity()
        .send()
        .await
    {
        Ok(me) => (me.arn().map(str::to_string), None),
        Err(e) => (
            None,
            Some(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string()),
        ),
    };
    let expiry = creds
        .expiry()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    println!(
        "{REPORT}{}",
        json!({
            "access_key_id": creds.access_key_id(),
            "expiry": expiry,
            "arn": arn,
            "sts_error": sts_error,
        })
    );
}
