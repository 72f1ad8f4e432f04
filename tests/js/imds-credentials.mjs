// Resolve credentials the way the AWS SDK for JavaScript v3 does on EC2, and print them as JSON.
//
// Used by tests/e2e/test_sdk_clients.py. The provider honours AWS_EC2_METADATA_SERVICE_ENDPOINT
// (the tests point it at credlock), fetches an IMDSv2 token, lists the role and reads its
// credentials, falling back to IMDSv1 on 403/404/405 like every SDK.
//
//   AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:PORT node imds-credentials.mjs
//
// stdout: {"accessKeyId": ..., "secretAccessKey": ..., "sessionToken": ..., "expiration": ...,
//          "accountId": ... or null}; exit 1 with the error on stderr if resolution fails.
import { fromInstanceMetadata } from "@smithy/credential-provider-imds";

try {
  // SDK defaults (timeout 1000 ms, no retries): what an application gets.
  const credentials = await fromInstanceMetadata()();
  const output = {
    accessKeyId: credentials.accessKeyId,
    secretAccessKey: credentials.secretAccessKey,
    sessionToken: credentials.sessionToken,
    expiration: credentials.expiration ? credentials.expiration.toISOString() : null,
    accountId: credentials.accountId ?? null,
  };
  process.stdout.write(JSON.stringify(output) + "\n");
} catch (error) {
  process.stderr.write(`imds-credentials: ${error?.name}: ${error?.message}` +
    (error?.statusCode ? ` (HTTP ${error.statusCode})` : "") + "\n");
  process.exit(1);
}
