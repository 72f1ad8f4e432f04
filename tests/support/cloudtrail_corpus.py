#!/usr/bin/env python3
"""A synthetic CloudTrail corpus with known answers, for `credlock audit` (src/audit.rs).

Writes CloudTrail log files in the S3 delivery layout
(AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/<account>_CloudTrail_<region>_<time>_<id>.json.gz,
gzipped {"Records": [...]}) plus, unless --no-extras, a plain delivery file, a gzipped JSON-lines
export, a digest file and malformed files; and an answers file: the two lists the audit must
report (grouped, counted, sorted as the engine sorts them), every counter, the skipped files,
and the environment the judge must apply.

Every event is generated from a category whose classification is known by construction:

  locked_denied     a credlock session (sourceIdentity credlock-<instance>) denied by the
                    session policy, from an outside address: AccessDenied or
                    AccessDeniedException "... with an explicit deny in a session policy", or
                    EC2's Client.UnauthorizedOperation                     -> denied_locked
  locked_ok         a credlock session's successful call from inside     -> records_locked_other
  locked_other_deny a credlock session denied by an identity policy      -> records_locked_other
  native_inside     an instance-profile session (ec2RoleDelivery) from an address inside the
                    environment, through an allowed VPC endpoint, or via an AWS service
                    (invokedBy / a service name as sourceIPAddress)       -> records_native_allowed
  native_outside    an instance-profile session from an outside address or through another
                    VPC endpoint                                          -> would_deny
  noise             IAM users, AWS services, other role sessions, records without
                    userIdentity                                          -> records_ignored

The judge (tests/audit_corpus.rs, examples/audit_bench.rs) allows a call when it is via an AWS
service, or comes through one of environment.vpc_endpoints, or (no endpoint) from an address in
environment.cidrs; otherwise its advice is "<action> from <source> is outside the environment
of <instance>".

Usage:
  cloudtrail_corpus.py --out DIR --answers FILE [--seed N] [--files N] [--events-per-file N]
                       [--size-mb N] [--no-extras] [--compresslevel N]
--size-mb N keeps writing files until at least N MB (10^6 bytes) of uncompressed JSON exist
(the benchmark); --files then is ignored. --distinct-sources makes most events denials or
would-be denials, each from an address never used before (one group per event: the group cap's
benchmark); the answers then carry every counter but empty lists. Only the standard library is
used.
"""

import argparse
import gzip
import ipaddress
import json
import os
import random
import sys
from datetime import datetime, timedelta, timezone

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
REGION = "eu-west-1"
ROLE = "app-instance-role"
ENV_CIDRS = ["203.0.113.0/24", "2001:db8:1::/48"]
ENV_VPCES = ["vpce-0a1b2c3d4e5f60001"]
INSTANCES = ["i-0%016x" % (0x1111111111111111 * k) for k in range(1, 9)]
INSIDE_IPS = ["203.0.113.%d" % k for k in (5, 17, 44, 200)] + ["2001:db8:1::10", "2001:db8:1:2::7"]
OUTSIDE_IPS = ["192.0.2.%d" % k for k in (10, 11, 12)] + ["198.51.100.%d" % k for k in (7, 8)] + ["2001:db8:bad::1"]
ATTACKER_IPS = ["198.51.100.66", "192.0.2.250", "2001:db8:dead::1", "100.64.7.9"]
PRIVATE_IPS = ["10.0.1.%d" % k for k in (5, 6, 7)]
BAD_VPCES = ["vpce-0ffffffffffff0001", "vpce-0ffffffffffff0002"]
SERVICE_SOURCES = ["s3.amazonaws.com", "AWS Internal", "cloudformation.amazonaws.com"]
# (eventSource, eventName); the IAM prefix is the first label except monitoring -> cloudwatch.
CALLS = [
    ("s3.amazonaws.com", "GetObject"),
    ("s3.amazonaws.com", "PutObject"),
    ("ec2.amazonaws.com", "DescribeInstances"),
    ("kms.amazonaws.com", "Decrypt"),
    ("dynamodb.amazonaws.com", "GetItem"),
    ("sts.amazonaws.com", "GetCallerIdentity"),
    ("monitoring.amazonaws.com", "PutMetricData"),
    ("ssm.amazonaws.com", "GetParameter"),
    ("secretsmanager.amazonaws.com", "GetSecretValue"),
    ("logs.amazonaws.com", "PutLogEvents"),
]
PREFIX_EXCEPTIONS = {"monitoring": "cloudwatch", "tagging": "tag"}
START = datetime(2026, 11, 30, tzinfo=timezone.utc)
SPAN_SECONDS = 2 * 86400
CATEGORIES = [  # (name, weight)
    ("locked_denied", 6),
    ("locked_ok", 20),
    ("locked_other_deny", 2),
    ("native_inside", 30),
    ("native_outside", 8),
    ("noise", 34),
]


def action(source, name):
    host = source.split(".", 1)[0]
    return "%s:%s" % (PREFIX_EXCEPTIONS.get(host, host), name)


def source_key(ip, vpce):
    """The engine's Source: (JSON key, value, sort key)."""
    if vpce:
        return "vpc_endpoint_id", vpce, (0, vpce)
    try:
        addr = ipaddress.ip_address(ip)
        return "source_ip", str(addr), (1, (addr.version, addr.packed))
    except ValueError:
        pass
    low = ip.lower()
    if low == "aws internal" or low.endswith(".amazonaws.com") or low.endswith(".amazonaws.com.cn"):
        return "source_service", ip, (2, ip)
    return "source_other", ip, (3, ip)


class Answers:
    def __init__(self):
        self.lists = {"denied_locked": {}, "would_deny": {}}
        self.counters = dict.fromkeys(
            [
                "files_read",
                "digest_files",
                "records_read",
                "records_denied_locked",
                "records_locked_other",
                "records_would_deny",
                "records_native_allowed",
                "records_ignored",
                "records_cross_account",
            ],
            0,
        )
        self.skipped = []
        self.lists_off = False

    def group(self, which, instance, ip, vpce, event_source, event_name, time, advice=None):
        if self.lists_off:
            return
        key_name, value, sort = source_key(ip, vpce)
        key = (instance, sort, event_source, event_name)
        g = self.lists[which].get(key)
        if g is None:
            g = {"instance_id": instance, key_name: value, "event_source": event_source,
                 "event_name": event_name, "count": 0, "first_seen": time, "last_seen": time}
            if advice is not None:
                g["advice"] = advice
            self.lists[which][key] = g
        g["count"] += 1
        g["first_seen"] = min(g["first_seen"], time)
        g["last_seen"] = max(g["last_seen"], time)

    def count(self, outcome):
        """One record the engine will read, with its known classification."""
        self.counters["records_read"] += 1
        self.counters["records_" + outcome] += 1

    def to_json(self):
        out = {"environment": {"cidrs": ENV_CIDRS, "vpc_endpoints": ENV_VPCES}}
        for which, groups in self.lists.items():
            items = sorted(groups.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
            out[which] = [g for _, g in items]
        out.update(self.counters)
        out["dropped_groups"] = 0
        out["dropped_events"] = 0
        out["skipped"] = sorted(self.skipped)
        out["lists_in_answers"] = not self.lists_off
        return out


class Generator:
    def __init__(self, seed, answers, distinct=False):
        self.rng = random.Random(seed)
        self.answers = answers
        self.distinct = distinct
        self.next_source = 0
        self.weights = [47, 1, 0, 2, 47, 3] if distinct else [w for _, w in CATEGORIES]

    def fresh_ip(self, network):
        """An address of `network` never returned before (--distinct-sources)."""
        self.next_source += 1
        net = ipaddress.ip_network(network)
        return str(net.network_address + self.next_source % net.num_addresses)

    def time(self):
        t = START + timedelta(seconds=self.rng.randrange(SPAN_SECONDS))
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def hexid(self, n):
        return "%0*x" % (n, self.rng.getrandbits(4 * n))

    def role_identity(self, session, source_identity=None, role_delivery=None, role=ROLE):
        context = {
            "sessionIssuer": {"type": "Role", "principalId": "AROAEXAMPLEROLEID0001",
                              "arn": "arn:aws:iam::%s:role/%s" % (ACCOUNT, role),
                              "accountId": ACCOUNT, "userName": role},
            "attributes": {"creationDate": "2026-11-30T00:00:00Z", "mfaAuthenticated": "false"},
        }
        if role_delivery is not None:
            context["ec2RoleDelivery"] = role_delivery
        if source_identity is not None:
            context["sourceIdentity"] = source_identity
        return {
            "type": "AssumedRole",
            "principalId": "AROAEXAMPLEROLEID0001:%s" % session,
            "arn": "arn:aws:sts::%s:assumed-role/%s/%s" % (ACCOUNT, role, session),
            "accountId": ACCOUNT,
            "accessKeyId": "ASIA" + self.hexid(16).upper(),
            "sessionContext": context,
        }

    def event(self, identity, call, ip, time, vpce=None, error=None, recipient=ACCOUNT):
        source, name = call
        e = {
            "eventVersion": "1.10",
            "userIdentity": identity,
            "eventTime": time,
            "eventSource": source,
            "eventName": name,
            "awsRegion": REGION,
            "sourceIPAddress": ip,
            "userAgent": "aws-sdk-go-v2/1.30.3 os/linux lang/go#1.22.5 md/GOOS#linux api/%s#1.0" % source.split(".")[0],
            "requestParameters": {"resource": "arn:aws:%s:%s:%s:thing/%s" % (source.split(".")[0], REGION, ACCOUNT, self.hexid(12)),
                                  "maxResults": self.rng.randrange(1, 1000), "filters": [{"name": "tag:team", "values": ["payments"]}]},
            "responseElements": None,
            "requestID": self.hexid(32).upper(),
            "eventID": "%s-%s-%s-%s-%s" % (self.hexid(8), self.hexid(4), self.hexid(4), self.hexid(4), self.hexid(12)),
            "readOnly": name.startswith(("Get", "Describe", "List")),
            "eventType": "AwsApiCall",
            "managementEvent": source != "s3.amazonaws.com",
            "recipientAccountId": recipient,
            "eventCategory": "Management" if source != "s3.amazonaws.com" else "Data",
            "tlsDetails": {"tlsVersion": "TLSv1.3", "cipherSuite": "TLS_AES_128_GCM_SHA256",
                           "clientProvidedHostHeader": "%s.%s.amazonaws.com" % (source.split(".")[0], REGION)},
        }
        if error is not None:
            e["errorCode"], e["errorMessage"] = error
        if vpce is not None:
            e["vpcEndpointId"] = vpce
            e["vpcEndpointAccountId"] = ACCOUNT
        return e

    def session_denial(self, instance, call):
        source, name = call
        arn = "arn:aws:sts::%s:assumed-role/%s/%s" % (ACCOUNT, ROLE, instance)
        if source == "ec2.amazonaws.com":
            return ("Client.UnauthorizedOperation",
                    "You are not authorized to perform this operation. User: %s is not authorized to perform: "
                    "ec2:%s with an explicit deny in a session policy. Encoded authorization failure message: %s"
                    % (arn, name, self.hexid(64)))
        code = "AccessDenied" if source in ("s3.amazonaws.com", "sts.amazonaws.com") else "AccessDeniedException"
        return (code, "User: %s is not authorized to perform: %s on resource: arn:aws:%s:::x with an explicit deny "
                      "in a session policy" % (arn, action(source, name), source.split(".")[0]))

    def one(self):
        """One event and its known outcome, recorded in the answers."""
        rng, a = self.rng, self.answers
        category = rng.choices([c for c, _ in CATEGORIES], weights=self.weights)[0]
        instance = rng.choice(INSTANCES)
        call = rng.choice(CALLS)
        time = self.time()
        if category == "locked_denied":
            ip = self.fresh_ip("100.64.0.0/10") if self.distinct else rng.choice(ATTACKER_IPS)
            locked = self.role_identity(instance, source_identity="credlock-" + instance)
            # A few copies delivered to the resource's account (cross-account calls).
            recipient = OTHER_ACCOUNT if rng.random() < 0.05 else ACCOUNT
            e = self.event(locked, call, ip, time, error=self.session_denial(instance, call), recipient=recipient)
            a.count("denied_locked")
            a.counters["records_cross_account"] += recipient != ACCOUNT
            a.group("denied_locked", instance, ip, None, call[0], call[1], time)
        elif category in ("locked_ok", "locked_other_deny"):
            locked = self.role_identity(instance, source_identity="credlock-" + instance)
            error = None
            if category == "locked_other_deny":
                error = ("AccessDenied", "User: x is not authorized to perform: %s because no identity-based policy "
                                         "allows the %s action" % (action(*call), action(*call)))
            e = self.event(locked, call, rng.choice(INSIDE_IPS), time, error=error)
            a.count("locked_other")
        elif category == "native_inside":
            native = self.role_identity(instance, role_delivery=rng.choice(["1.0", "2.0"]))
            how = rng.randrange(4)
            if how == 0:
                e = self.event(native, call, rng.choice(PRIVATE_IPS), time, vpce=ENV_VPCES[0])
            elif how == 1:
                native["invokedBy"] = rng.choice(["s3.amazonaws.com", "cloudformation.amazonaws.com"])
                e = self.event(native, call, rng.choice(SERVICE_SOURCES), time)
            else:
                e = self.event(native, call, rng.choice(INSIDE_IPS), time)
            a.count("native_allowed")
        elif category == "native_outside":
            native = self.role_identity(instance, role_delivery="2.0")
            if rng.random() < 0.2:
                vpce, ip = rng.choice(BAD_VPCES), rng.choice(PRIVATE_IPS)
                source = vpce
            else:
                vpce = None
                ip = self.fresh_ip("198.18.0.0/15") if self.distinct else rng.choice(OUTSIDE_IPS)
                source = ip
            e = self.event(native, call, ip, time, vpce=vpce)
            advice = "%s from %s is outside the environment of %s" % (action(*call), source, instance)
            a.count("would_deny")
            a.group("would_deny", instance, ip, vpce, call[0], call[1], time, advice)
        else:
            kind = rng.randrange(5)
            ip = rng.choice(ATTACKER_IPS + INSIDE_IPS)
            if kind == 0:
                identity = {"type": "IAMUser", "principalId": "AIDAEXAMPLEUSER00001",
                            "arn": "arn:aws:iam::%s:user/alice" % ACCOUNT, "accountId": ACCOUNT,
                            "accessKeyId": "AKIA" + self.hexid(16).upper(), "userName": "alice"}
            elif kind == 1:
                identity = {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"}
                ip = "ec2.amazonaws.com"
            elif kind == 2:
                # Another role's session, with a source identity that is not credlock's.
                identity = self.role_identity("alice@example.com", source_identity="alice@example.com", role="deployer")
            elif kind == 3:
                identity = self.role_identity("build-%s" % self.hexid(6), role="ci")
            else:
                identity = None
            e = self.event(identity, call, ip, time)
            if identity is None:
                del e["userIdentity"]
            a.count("ignored")
        return e


def dumps(record):
    return json.dumps(record, separators=(",", ":"))


def write_gz(path, data, level):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wb", compresslevel=level) as f:
        f.write(data)


def delivery_path(out, gen, when, extension=".json.gz"):
    day = "%s/AWSLogs/%s/CloudTrail/%s/%s" % (out, ACCOUNT, REGION, when.strftime("%Y/%m/%d"))
    return "%s/%s_CloudTrail_%s_%s_%s%s" % (day, ACCOUNT, REGION, when.strftime("%Y%m%dT%H%MZ"), gen.hexid(16), extension)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--answers", required=True)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--events-per-file", type=int, default=150)
    p.add_argument("--size-mb", type=float, default=None)
    p.add_argument("--no-extras", action="store_true", help="only the gzipped delivery files")
    p.add_argument("--compresslevel", type=int, default=6)
    p.add_argument("--distinct-sources", action="store_true",
                   help="one group per denial (the group cap's benchmark); lists not in the answers")
    args = p.parse_args(argv)

    answers = Answers()
    answers.lists_off = args.distinct_sources
    gen = Generator(args.seed, answers, distinct=args.distinct_sources)
    out = args.out.rstrip("/")
    written = 0
    files = 0
    while True:
        if args.size_mb is not None:
            if written >= args.size_mb * 1e6:
                break
        elif files >= args.files:
            break
        records = [dumps(gen.one()) for _ in range(args.events_per_file)]
        data = ('{"Records":[' + ",".join(records) + "]}").encode()
        when = START + timedelta(minutes=5 * files)
        write_gz(delivery_path(out, gen, when), data, args.compresslevel)
        answers.counters["files_read"] += 1
        written += len(data)
        files += 1

    if not args.no_extras:
        written += extras(out, gen, answers, args.compresslevel)

    with open(args.answers, "w") as f:
        json.dump(answers.to_json(), f, indent=1)
    print("wrote %d delivery files, %d records, %.1f MB uncompressed JSON to %s"
          % (files, answers.counters["records_read"], written / 1e6, out), file=sys.stderr)
    return 0


def extras(out, gen, answers, level):
    """Other formats and malformed files, each with its exact contribution to the answers."""
    written = 0
    # A plain (not gzipped) delivery file and a gzipped JSON-lines export.
    data = ('{"Records":[' + ",".join(dumps(gen.one()) for _ in range(50)) + "]}").encode()
    path = delivery_path(out, gen, START + timedelta(days=1), extension=".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    written += len(data)
    data = "".join(dumps(gen.one()) + "\n" for _ in range(80)).encode()
    write_gz("%s/exports/lake-export.jsonl.gz" % out, data, level)
    written += len(data)
    answers.counters["files_read"] += 2
    # A digest file: counted, not read.
    digest = "%s/AWSLogs/%s/CloudTrail-Digest/%s/2026/11/30/%s_CloudTrail-Digest_%s_trail_%s_20261130T010000Z.json.gz" % (
        out, ACCOUNT, REGION, ACCOUNT, REGION, REGION)
    write_gz(digest, b'{"awsAccountId":"%s","digestStartTime":"2026-11-30T00:00:00Z","logFiles":[]}' % ACCOUNT.encode(), level)
    answers.counters["digest_files"] += 1

    bad = "%s/malformed" % out
    os.makedirs(bad, exist_ok=True)

    def skipped(name, data, compress=True):
        path = "%s/%s" % (bad, name)
        if compress:
            write_gz(path, data, level)
        else:
            with open(path, "wb") as f:
                f.write(data)
        answers.skipped.append(path)

    # gzip magic then garbage: nothing read.
    skipped("bad-gzip.json.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03not deflate at all", compress=False)
    # Not JSON at all, and an empty file.
    skipped("notes.txt", b"these are not the logs you are looking for\n", compress=False)
    skipped("empty.json.gz", b"")
    # Records is not an array.
    skipped("records-object.json.gz", b'{"Records":{"eventName":"GetObject"}}')
    # A truncated array: the complete records before the cut are counted, the cut one is not.
    kept = [dumps(gen.one()) for _ in range(7)]
    cut = dumps(gen.event(None, CALLS[0], "192.0.2.1", "2026-11-30T00:00:00Z"))
    skipped("truncated.json.gz", ('{"Records":[' + ",".join(kept) + "," + cut[: len(cut) // 2]).encode())
    # A record with a field of the wrong type: the records before it are counted.
    kept = [dumps(gen.one()) for _ in range(5)]
    wrong = gen.event(None, CALLS[0], "192.0.2.1", "2026-11-30T00:00:00Z")
    wrong["eventName"] = 42
    skipped("wrong-type.json.gz", ('{"Records":[' + ",".join(kept + [dumps(wrong)] + kept) + "]}").encode())
    # Invalid JSON on the third line of a JSON-lines file: the first two lines are counted.
    kept = [dumps(gen.one()) for _ in range(2)]
    skipped("invalid-line.jsonl.gz", ("\n".join(kept) + '\n{"eventName": ,}\n').encode())
    return written


if __name__ == "__main__":
    sys.exit(main())
