//! The application side of tests/ecs_sdk.rs, run by it in a child process with the container
//! environment set: the AWS Rust SDK's ECS provider reads `AWS_CONTAINER_CREDENTIALS_FULL_URI`
//! (credlock's ECS listener), and an STS client signs GetCallerIdentity with what it got
//! (against moto, `CREDLOCK_TEST_ECS_SDK_STS`). Prints one `ECS-SDK-REPORT {json}` line.

use std::time::UNIX_EPOCH;

use aws_credential_types::provider::ProvideCredentials;
use serde_json::json;

const CHILD_STS: &str = "CREDLOCK_TEST_ECS_SDK_STS";
const REPORT: &str = "ECS-SDK-REPORT ";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Ok(sts) = std::env::var(CHILD_STS) else {
        eprintln!("ecs_sdk_child: run by tests/ecs_sdk.rs ({CHILD_STS} unset)");
        std::process::exit(2);
    };
    let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
    let creds = provider.provide_credentials().await.unwrap_or_else(|e| {
        panic!(
            "EcsCredentialsProvider: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        )
    });
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(sts)
        .credentials_provider(provider)
        .build();
    let (arn, sts_error) = match aws_sdk_sts::Client::from_conf(conf)
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
        .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
    println!(
        "{REPORT}{}",
        json!({
            "access_key_id": creds.access_key_id(),
            "secret_access_key": creds.secret_access_key(),
            "session_token": creds.session_token(),
            "expiry": expiry,
            "arn": arn,
            "sts_error": sts_error,
        })
    );
}
