-- credlock tripwire over CloudTrail logs in Amazon Athena (engine v3, Trino SQL).
--
-- The same detection as credlock-tripwire.pattern.json (EventBridge) and
-- credlock-tripwire.logs-insights.txt: CloudTrail events of a credlock session (SourceIdentity
-- "credlock-<instance-id>") refused by credlock's own session policy, one row per instance,
-- source IP / VPC endpoint and action, with counts, first/last seen and the access key ids
-- (the join to credlock's "locked credentials served to a caller" log line). TRIPWIRE.md says
-- what a row means and what to do.
--
-- Table: the one from "Create a table for CloudTrail logs in Athena using manual partitioning"
-- (https://docs.aws.amazon.com/athena/latest/ug/create-cloudtrail-table.html), named
-- cloudtrail_logs, with ONE ADDITION: AWS's DDL has no sourceidentity in the sessioncontext
-- struct, and the JSON SerDe drops fields the table does not declare. Add it next to
-- ec2roledelivery:
--
--     sessioncontext:STRUCT<
--       attributes:STRUCT<mfaauthenticated:STRING, creationdate:STRING>,
--       sessionissuer:STRUCT<type:STRING, principalid:STRING, arn:STRING, accountid:STRING, username:STRING>,
--       ec2roledelivery:string,
--       sourceidentity:string,                       -- <- added for this query
--       webidfederationdata: STRUCT<federatedprovider: STRING, attributes: map<string,string>>
--     >
--
-- Without it this query fails with a column error rather than returning nothing.
-- CloudTrail writes the field as userIdentity.sessionContext.sourceIdentity in every event of a
-- session that has one ("CloudTrail userIdentity element", section "AWS STS source identity",
-- https://docs.aws.amazon.com/awscloudtrail/latest/userguide/cloudtrail-event-reference-user-identity.html).
--
-- Cost: restrict the scan to the partitions you need, e.g. add
--     AND region = 'us-east-1' AND year = '2026' AND month = '03'
-- (manual partitions) or AND "timestamp" >= '2026/03/01' (partition projection).
--
-- Matching rules (kept identical in all three forms, checked by tests/tripwire):
--   * an authorization error code (…AccessDenied…, …UnauthorizedOperation, SNS's
--     AuthorizationError) whose message names an explicit deny in a session policy
--     (evidence = 'session-policy'); "%explicit deny in a session%" also matches the
--     "sessions policy" spelling of the IAM guide's example and a trailing ": <policy-arn>";
--   * EC2's Client.UnauthorizedOperation with a message that names no policy at all, only
--     "You are not authorized to perform this operation." with or without an encoded
--     authorization message (evidence = 'ec2-no-context': the policy type is only inside the
--     encoded message, decode it or judge by source_ip; see TRIPWIRE.md).

SELECT
  regexp_extract(useridentity.arn, 'assumed-role/([^/]+)/([^/]+)$', 2) AS instance_id,
  regexp_extract(useridentity.arn, 'assumed-role/([^/]+)/([^/]+)$', 1) AS role_name,
  useridentity.sessioncontext.sourceidentity AS source_identity,
  recipientaccountid AS account_id,
  sourceipaddress AS source_ip,
  coalesce(vpcendpointid, '-') AS vpc_endpoint,
  replace(eventsource, '.amazonaws.com', '') || ':' || eventname AS action,
  CASE
    WHEN errormessage LIKE '%explicit deny in a session%' THEN 'session-policy'
    ELSE 'ec2-no-context'
  END AS evidence,
  count(*) AS denials,
  min(eventtime) AS first_seen,
  max(eventtime) AS last_seen,
  array_sort(array_agg(DISTINCT useridentity.accesskeyid)) AS access_key_ids,
  array_sort(array_agg(DISTINCT awsregion)) AS regions
FROM cloudtrail_logs
WHERE useridentity.type = 'AssumedRole'
  AND useridentity.sessioncontext.sourceidentity LIKE 'credlock-%'
  AND (
    (
      (errorcode LIKE '%AccessDenied%'
        OR errorcode LIKE '%UnauthorizedOperation'
        OR errorcode = 'AuthorizationError')
      AND errormessage LIKE '%explicit deny in a session%'
    )
    OR (
      errorcode = 'Client.UnauthorizedOperation'
      AND (errormessage = 'You are not authorized to perform this operation.'
        OR errormessage LIKE 'You are not authorized to perform this operation. Encoded authorization failure message:%')
    )
  )
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
ORDER BY denials DESC, instance_id, action, source_ip
