#!/usr/bin/env python3
"""A faithful local emulator of the EC2 Instance Metadata Service (IMDS), the upstream of every
credlock test and of the README demo.

Standard library only (Python 3.11); the plumbing it shares with the other stand-ins (CLI,
start-up lines, request log, control API) is in standin.py next to it, which must travel with
it. Citations name AWS documents (page title and section; "AWS sources" at the end of this
docstring lists them). Rules marked ❓ are presumptions that no
AWS document confirms; each says what was picked. 🟡 marks behaviour reported from real
instances that AWS documentation does not state.

    python3 imds_emulator.py --listen 127.0.0.1:0 [--listen [::1]:0] [--tokens optional|required]
                             [--instance FILE.json] [--control 127.0.0.1:0]

It prints one line per bound socket, IMDS listeners first, flushed, then serves until
SIGTERM/SIGINT (exit 0):

    listening 127.0.0.1:41234
    listening [::1]:41235
    control 127.0.0.1:41236

IMDS protocol implemented (EC2 UG "How Instance Metadata Service Version 2 works" and
"Retrieve instance metadata"):
  * PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds: 1..21600 -> 200 + token
    ("How Instance Metadata Service Version 2 works"); bad TTL -> 400; X-Forwarded-For -> 403;
    versioned or other PUT paths -> 403.
  * GET/HEAD with X-aws-ec2-metadata-token: unknown/expired token -> 401; with --tokens required,
    no token -> 401 ("How Instance Metadata Service Version 2 works"; "Retrieve instance
    metadata", Responses and error messages). Any other method -> 405 (❓ no AWS document gives
    IMDS's answer to other methods).
  * With tokens optional, IMDSv1 (no token) and IMDSv2 (token) requests get DIFFERENT role
    credential sets (EC2 API Reference, ModifyInstanceMetadataOptions, HttpTokens): AccessKeyId
    ASIAV1... versus ASIAV2..., so tests can prove which set (if any) leaked through the proxy.
  * The metadata tree of EC2 UG "Instance metadata categories", "IAM roles for Amazon EC2" and
    "Instance identity documents" under every version in VERSIONS, with the categories newer
    than a version answering 404 under it.

Control API (JSON, only on the --control listener; never on an IMDS listener):
  GET  /state            the whole state, including the current credential sets
  POST /state            merge keys: tokens, role, instance_profile, interfaces, delay_ms, down,
                         credentials, extended, user_data (see Emulator.merge for the semantics)
  POST /rotate           new v1, v2 and identity credential sets (new LastUpdated/Expiration)
  GET  /requests         the last 1000 IMDS requests: method, path (raw target), version,
                         headers [[name, value], ...], client, listener, status
  POST /requests/clear   forget them
  POST /tokens/clear     invalidate every IMDSv2 token issued so far
  POST /reset            back to the start-up state (also clears tokens and requests)

--instance FILE.json overrides the defaults; see DEFAULT_INSTANCE for every key and
instance-example.json next to this file for an example. Keys starting with "_" are comments;
any other unknown key is an error (exit 2).

Deliberate leniency: like an ordinary web server, the emulator collapses repeated '/' and
ignores a query string (`//latest//meta-data/iam/info?x=1` answers like `/latest/meta-data/iam/info`).
Whether real IMDS does is ❓: EC2 UG "Retrieve instance metadata" does not say how IMDS treats
'//', a query string, '%2F' or '..'. It is lenient on purpose: proxy tests must show that
credlock refuses such targets itself instead of relying on the upstream to 404 them. It does NOT
decode percent-escapes or resolve '.'/'..' segments: those simply match nothing and get 404.

AWS sources cited in this file:
  * Amazon EC2 User Guide ("EC2 UG"), https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/<page>:
      "How Instance Metadata Service Version 2 works"  instance-metadata-v2-how-it-works.html
      "Retrieve instance metadata"                     instancedata-data-retrieval.html
      "Instance metadata categories"                   instancedata-data-categories.html
      "IAM roles for Amazon EC2"                       iam-roles-for-amazon-ec2.html
      "Instance identity documents"                    instance-identity-documents.html
  * Amazon EC2 API Reference, ModifyInstanceMetadataOptions (parameter HttpTokens),
    https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyInstanceMetadataOptions.html
  * AWS SDKs and Tools Reference Guide, "IMDS credential provider",
    https://docs.aws.amazon.com/sdkref/latest/guide/feature-imds-credentials.html
  * AWS SDK source: botocore/utils.py (github.com/boto/botocore) and
    aws/rust-runtime/aws-config/src/imds/ (github.com/smithy-lang/smithy-rs).
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import hashlib
import http
import json
import secrets
import string
import sys
import time
import urllib.parse

import standin
from standin import Backend, ValidationError, check_runtime_keys, random_chars
# Kept importable from here: tests/adversarial/adv_upstream.py uses them.
from standin import format_address, parse_address  # noqa: F401

# --------------------------------------------------------------------------------------------
# Protocol constants (EC2 UG "How Instance Metadata Service Version 2 works", "Retrieve instance
# metadata")
# --------------------------------------------------------------------------------------------

# The only path that issues tokens (EC2 UG "Retrieve instance metadata", Considerations).
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # header names are matched case-insensitively
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
# "a minimum of one second and a maximum of six hours" (EC2 UG "How Instance Metadata Service
# Version 2 works")
TTL_MIN_SECONDS = 1
TTL_MAX_SECONDS = 21600
# Rejected on PUT (EC2 UG "How Instance Metadata Service Version 2 works").
FORWARDED_FOR_HEADER = "X-Forwarded-For"

# 🟡 No AWS document names the Server header; "EC2ws" is what real instances were reported to
# send (e.g. in github.com/awslabs/aws-sdk-rust/issues/560).
SERVER_HEADER = "EC2ws"
# Typical lifetime about 6 h 🟡: AWS documents no lifetime, only that new credentials appear "at
# least five minutes before the expiration of the old credentials" (EC2 UG "IAM roles for Amazon
# EC2", Retrieve security credentials from instance metadata); 6 h is a community observation.
CREDENTIAL_LIFETIME = datetime.timedelta(hours=6)

# Metadata versions listed by GET / ("1.0, 2007-01-19, … latest": EC2 UG "Retrieve instance
# metadata", Get the available versions of the instance metadata). These are the dates seen on
# real instances, plus the category-introduction dates 2018-05-23 and 2020-08-24 of EC2 UG
# "Instance metadata categories" (column "Version introduced") so tests can probe both sides of
# each boundary. Listed in this (chronological) order.
VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
    "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25",
    "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28",
    "2018-05-23", "2018-08-17", "2018-09-24", "2019-10-01", "2020-08-24", "2020-10-27",
    "2021-01-03", "2021-03-23", "2021-07-15", "2022-09-24", "latest",
)

# Version that introduced a category (EC2 UG "Instance metadata categories", column "Version
# introduced"). Under an older version the category is absent: not listed, and 404. Everything
# else exists under every version (a simplification). security-credentials-extended has no
# documented date (❓ that page does not list it): it follows iam/.
SINCE_IAM = "2012-01-12"
SINCE_IDENTITY_CREDENTIALS = "2018-05-23"
SINCE_PLACEMENT_REGION = "2020-08-24"
SINCE_IPV6 = "2021-01-03"  # meta-data/ipv6 (EC2 UG "Instance metadata categories")

# --------------------------------------------------------------------------------------------
# Default instance (the contract's "IMDS emulator CLI" section)
# --------------------------------------------------------------------------------------------

DEFAULT_INSTANCE = {
    "instance_id": "i-0123456789abcdef0",
    "account_id": "123456789012",
    "region": "us-east-1",
    "availability_zone": "us-east-1a",
    "availability_zone_id": "use1-az1",
    "partition": "aws",
    "domain": None,  # None: derived from partition (amazonaws.com, amazonaws.com.cn)
    "ami_id": "ami-0abcdef1234567890",
    "ami_launch_index": 0,
    "instance_type": "t3.micro",
    "architecture": "x86_64",
    "pending_time": "2024-01-01T00:00:00Z",
    "reservation_id": "r-0fedcba9876543210",
    "security_groups": ["default"],
    "role": "credlock-test-role",  # string, or null for "no role attached"
    "instance_profile": None,  # None: same name as the role
    "instance_profile_id": None,  # None: a stable AIPA... id derived from the profile name
    "user_data": None,  # None: no user data (user-data 404, not listed)
    # The first interface is the primary ENI (meta-data/mac, local-ipv4, public-ipv4, ipv6).
    "interfaces": [
        {
            "mac": "0e:11:22:33:44:55",
            "device_number": 0,
            "interface_id": "eni-0aaaaaaaaaaaaaaa1",
            "local_ipv4s": ["172.31.16.10"],
            "public_ipv4s": ["203.0.113.10"],
            "ipv6s": [],
            "subnet_id": "subnet-0aaaaaaaaaaaaaaa1",
            "subnet_ipv4_cidr_block": "172.31.16.0/20",
            "subnet_ipv6_cidr_blocks": [],
            "vpc_id": "vpc-0abc1234def567890",
            "vpc_ipv4_cidr_blocks": ["172.31.0.0/16"],
            "vpc_ipv6_cidr_blocks": ["2001:db8:1::/56"],
            "security_group_ids": ["sg-0aaaaaaaaaaaaaaa1"],
        },
        {
            "mac": "0e:11:22:33:44:66",
            "device_number": 1,
            "interface_id": "eni-0bbbbbbbbbbbbbbb2",
            "local_ipv4s": ["172.31.32.20"],
            "public_ipv4s": ["203.0.113.20"],
            "ipv6s": ["2001:db8:1::10"],
            "subnet_id": "subnet-0bbbbbbbbbbbbbbb2",
            "subnet_ipv4_cidr_block": "172.31.32.0/20",
            "subnet_ipv6_cidr_blocks": ["2001:db8:1::/64"],
            "vpc_id": "vpc-0abc1234def567890",
            "vpc_ipv4_cidr_blocks": ["172.31.0.0/16"],
            "vpc_ipv6_cidr_blocks": ["2001:db8:1::/56"],
            "security_group_ids": ["sg-0aaaaaaaaaaaaaaa1"],
        },
    ],
}

# Interface keys; all but "mac" are optional. Optional extras: "owner_id" (default: the account),
# "local_hostname", "public_hostname", "ipv4_associations" ({public_ip: private_ip}; default:
# the i-th public IPv4 maps to the i-th private IPv4, or to the first).
INTERFACE_KEYS = set(DEFAULT_INSTANCE["interfaces"][0]) | {
    "owner_id", "local_hostname", "public_hostname", "ipv4_associations",
}

INTERFACE_LIST_KEYS = {
    "local_ipv4s", "public_ipv4s", "ipv6s", "subnet_ipv6_cidr_blocks", "vpc_ipv4_cidr_blocks",
    "vpc_ipv6_cidr_blocks", "security_group_ids",
}

# Runtime keys (control API only, not --instance).
DEFAULT_RUNTIME = {
    # HttpTokens (EC2 API Reference, ModifyInstanceMetadataOptions): optional | required
    "tokens": "optional",
    "delay_ms": 0,  # sleep before every IMDS answer (simulates a hanging upstream)
    "down": False,  # True: close IMDS connections without answering
    "extended": True,  # False: security-credentials-extended is 404 (an IMDS without it)
}

# Keys POST /state may change. Top-level values replace; "credentials" merges (see Emulator.merge).
MUTABLE_KEYS = {
    "tokens", "role", "instance_profile", "interfaces", "delay_ms", "down", "credentials",
    "extended", "user_data",
}

CREDENTIAL_SETS = ("v1", "v2", "identity")  # IMDSv1 role creds, IMDSv2 role creds, identity role

# Key order of the credentials document (the example in EC2 UG "IAM roles for Amazon EC2",
# Retrieve security credentials from instance metadata).
CREDENTIAL_KEYS = ("Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token",
                   "Expiration")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

# standin.utc_timestamp: YYYY-MM-DDTHH:MM:SSZ, no fraction, as in EC2 UG "IAM roles for Amazon
# EC2": botocore's strptime needs exactly this (botocore/utils.py, _evaluate_expiration).
utc_timestamp = standin.utc_timestamp


def aws_json(document: dict) -> str:
    """Render JSON the way IMDS does: two-space indent, `" : "` separators, keys in the given
    order, no trailing newline (the credentials example in EC2 UG "IAM roles for Amazon EC2";
    the identity document as in EC2 UG "Instance identity documents"; no trailing newline 🟡)."""
    return json.dumps(document, indent=2, separators=(",", " : "))


def new_credentials(label: str) -> dict:
    """A fresh credential set whose values show where they came from but cannot be guessed.

    label is V1, V2 or ID. AccessKeyId is 20 characters of [A-Z0-9] starting with ASIA (the
    prefix of temporary credentials), e.g. ASIAV1XXXXXXXXXXXXXX, so boto3 accepts it and tests
    can grep for "ASIAV1"/"ASIAV2" to prove a set did not leak through the proxy."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    upper_digits = string.ascii_uppercase + string.digits
    secret_alphabet = string.ascii_letters + string.digits + "+/"
    return {
        "Code": "Success",
        "LastUpdated": utc_timestamp(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIA" + label + random_chars(upper_digits, 20 - 4 - len(label)),
        # 40 characters like a real secret key; the prefix names the set.
        "SecretAccessKey": "imds" + label + "Secret" + random_chars(secret_alphabet, 40 - 10 - len(label)),
        # Real session tokens are long base64 blobs; this one is ~300 characters.
        "Token": "IMDS" + label + "Token" + base64.b64encode(secrets.token_bytes(216)).decode(),
        "Expiration": utc_timestamp(now + CREDENTIAL_LIFETIME),
    }


def fresh_credential_sets() -> dict:
    """IMDSv1 role set (ASIAV1...), IMDSv2 role set (ASIAV2...), instance identity (ASIAID...)."""
    return {name: new_credentials(label) for name, label in zip(CREDENTIAL_SETS, ("V1", "V2", "ID"))}


def new_token() -> str:
    """An opaque, unguessable IMDSv2 token (real ones look like AQAEA...==, 56 base64 chars)."""
    return base64.b64encode(b"\x01\x00\x04\x00" + secrets.token_bytes(38)).decode()


def version_has(version: str, since: str) -> bool:
    """Whether a category introduced in `since` exists under metadata version `version`."""
    if version == "latest":
        return True
    if version == "1.0":
        return False
    return version >= since  # dated versions compare correctly as strings


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def validate_interfaces(interfaces) -> None:
    if not isinstance(interfaces, list):
        raise ValidationError("interfaces must be a list")
    macs = set()
    for iface in interfaces:
        if not isinstance(iface, dict) or not isinstance(iface.get("mac"), str):
            raise ValidationError("each interface must be an object with a string 'mac'")
        unknown = set(iface) - INTERFACE_KEYS
        if unknown:
            raise ValidationError(f"unknown interface keys: {sorted(unknown)}")
        if iface["mac"] in macs:
            raise ValidationError(f"duplicate mac {iface['mac']}")
        macs.add(iface["mac"])
        for key, value in iface.items():
            if key == "device_number":
                ok_type = isinstance(value, int) and not isinstance(value, bool)
            elif key == "ipv4_associations":
                ok_type = isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            elif key in INTERFACE_LIST_KEYS:
                ok_type = isinstance(value, list) and all(isinstance(v, str) for v in value)
            else:
                ok_type = value is None or isinstance(value, str)
            if not ok_type:
                raise ValidationError(f"interface {iface['mac']}: bad value for {key}")


def validate_state(state: dict) -> None:
    if state["tokens"] not in ("optional", "required"):
        raise ValidationError("tokens must be 'optional' or 'required'")
    if state["role"] is not None and (not isinstance(state["role"], str) or not state["role"]
                                      or "/" in state["role"]):
        raise ValidationError("role must be a non-empty name without '/', or null")
    check_runtime_keys(state)
    if not isinstance(state["extended"], bool):
        raise ValidationError("extended must be true or false")
    if state["user_data"] is not None and not isinstance(state["user_data"], str):
        raise ValidationError("user_data must be a string or null")
    for key in ("instance_profile", "instance_profile_id"):
        if state[key] is not None and not isinstance(state[key], str):
            raise ValidationError(f"{key} must be a string or null")
    validate_interfaces(state["interfaces"])
    creds = state["credentials"]
    if not isinstance(creds, dict) or set(creds) != set(CREDENTIAL_SETS):
        raise ValidationError(f"credentials must have exactly the sets {list(CREDENTIAL_SETS)}")
    for name, fields in creds.items():
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise ValidationError(f"credentials.{name} must map field names to strings")


class Emulator(Backend):
    """All mutable state, behind one lock (standin.Backend, with the request log).

    Tokens map to their monotonic expiry, so wall-clock jumps cannot extend or cut them."""

    def __init__(self, instance: dict, tokens: str):
        super().__init__()
        self.initial = copy.deepcopy(instance)
        self.initial.update(DEFAULT_RUNTIME, tokens=tokens)
        self.state: dict = {}
        self.issued_tokens: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.state = copy.deepcopy(self.initial)
            self.state["credentials"] = fresh_credential_sets()
            self.issued_tokens.clear()
            self.requests.clear()

    def rotate(self) -> None:
        """New credential sets, as IMDS publishes "at least five minutes before the expiration of
        the old credentials" (EC2 UG "IAM roles for Amazon EC2").
        Nothing rotates on its own: tests set Expiration (POST /state) or call this."""
        with self.lock:
            self.state["credentials"] = fresh_credential_sets()

    # ---- tokens (EC2 UG "How Instance Metadata Service Version 2 works") ----

    def issue_token(self, ttl: int) -> str:
        now = time.monotonic()
        token = new_token()
        with self.lock:
            # Drop expired tokens so the table stays small however long the emulator runs.
            for stale in [t for t, expiry in self.issued_tokens.items() if expiry <= now]:
                del self.issued_tokens[stale]
            self.issued_tokens[token] = now + ttl
        return token

    def token_valid(self, token: str) -> bool:
        with self.lock:
            expiry = self.issued_tokens.get(token)
        return expiry is not None and time.monotonic() < expiry

    def clear_tokens(self) -> None:
        with self.lock:
            self.issued_tokens.clear()

    # ---- control API ----

    def snapshot(self) -> dict:
        with self.lock:
            result = copy.deepcopy(self.state)
            now = time.monotonic()
            result["active_tokens"] = sum(1 for e in self.issued_tokens.values() if e > now)
        return result

    def merge(self, patch: dict) -> dict:
        """POST /state. Top-level keys replace their value (so "role": null detaches the role
        and "interfaces" replaces the whole list). "credentials" is merged per set and per field,
        RFC 7386 style: {"credentials": {"v2": {"Expiration": "...", "Token": null}}} changes one
        field and deletes another (to serve malformed documents), leaving the rest alone."""
        if not isinstance(patch, dict):
            raise ValidationError("body must be a JSON object")
        unknown = set(patch) - MUTABLE_KEYS
        if unknown:
            raise ValidationError(f"unknown or read-only keys: {sorted(unknown)}; "
                                  f"allowed: {sorted(MUTABLE_KEYS)}")
        with self.lock:
            candidate = copy.deepcopy(self.state)
            for key, value in patch.items():
                if key != "credentials":
                    candidate[key] = copy.deepcopy(value)
                    continue
                if not isinstance(value, dict) or set(value) - set(CREDENTIAL_SETS):
                    raise ValidationError(f"credentials keys must be among {list(CREDENTIAL_SETS)}")
                for name, fields in value.items():
                    if not isinstance(fields, dict):
                        raise ValidationError(f"credentials.{name} must be an object")
                    for field, field_value in fields.items():
                        if field_value is None:
                            candidate["credentials"][name].pop(field, None)
                        else:
                            candidate["credentials"][name][field] = field_value
            validate_state(candidate)
            self.state = candidate
        return self.snapshot()

    def runtime(self) -> tuple[float, bool, str]:
        with self.lock:
            return self.state["delay_ms"], self.state["down"], self.state["tokens"]

    # ---- the metadata tree ----

    def tree(self, version: str, delivery: str) -> dict:
        """The tree under /<version>/ for a request delivered as "v1" (no token) or "v2".

        A dict is a directory, a str is a leaf, bytes is user-data. Absent keys answer 404,
        which is how missing fields (an ENI without IPv6, no role, ...) are expressed."""
        with self.lock:
            return build_tree(self.state, version, delivery)


def derived_domain(state: dict) -> str:
    if state.get("domain"):
        return state["domain"]
    return "amazonaws.com.cn" if state["partition"] == "aws-cn" else "amazonaws.com"


def private_hostname(state: dict, ipv4: str) -> str:
    suffix = "ec2.internal" if state["region"] == "us-east-1" else f"{state['region']}.compute.internal"
    return f"ip-{ipv4.replace('.', '-')}.{suffix}"


def public_hostname(state: dict, ipv4: str) -> str:
    if state["region"] == "us-east-1":
        return f"ec2-{ipv4.replace('.', '-')}.compute-1.{derived_domain(state)}"
    return f"ec2-{ipv4.replace('.', '-')}.{state['region']}.compute.{derived_domain(state)}"


def profile_id(name: str) -> str:
    """A stable instance-profile id: AIPA + 17 of [A-Z0-9] (21 characters like real ones)."""
    alphabet = string.ascii_uppercase + string.digits
    digest = hashlib.sha256(name.encode()).digest()
    return "AIPA" + "".join(alphabet[b % len(alphabet)] for b in digest[:17])


def credential_document(fields: dict, account_id: str | None) -> str:
    """The credentials JSON of EC2 UG "IAM roles for Amazon EC2" (Retrieve security credentials
    from instance metadata).

    Code Success: the documented keys in the documented order, then any extra fields a test
    added. Other Code (e.g. AssumeRoleUnauthorizedAccess): IMDS answers 200 with only Code,
    Message and LastUpdated (🟡 not in the EC2 UG; AWS SDKs handle it: botocore/utils.py
    InstanceMetadataFetcher, aws-config src/imds/credentials.rs). account_id is set on the
    extended path: AccountId goes LAST, after Expiration (❓ the EC2 UG does not document
    security-credentials-extended, so no order is given; AWS SDK code and tests only show that
    AccountId is added. Appending keeps the legacy document as an exact prefix)."""
    if fields.get("Code", "Success") != "Success":
        keys = [k for k in ("Code", "Message", "LastUpdated") if k in fields]
    else:
        keys = [k for k in CREDENTIAL_KEYS if k in fields]
        keys += [k for k in fields if k not in CREDENTIAL_KEYS]
    document = {k: fields[k] for k in keys}
    if account_id is not None and fields.get("Code", "Success") == "Success":
        document["AccountId"] = account_id
    return aws_json(document)


def interface_tree(state: dict, iface: dict) -> dict:
    """network/interfaces/macs/<mac>/ (EC2 UG "Instance metadata categories"). Empty lists are
    absent fields -> 404."""
    node: dict = {
        "mac": iface["mac"],
        "device-number": str(iface.get("device_number", 0)),
        "owner-id": iface.get("owner_id") or state["account_id"],
    }
    optional_scalars = {
        "interface-id": "interface_id", "subnet-id": "subnet_id", "vpc-id": "vpc_id",
        "subnet-ipv4-cidr-block": "subnet_ipv4_cidr_block",
    }
    for name, key in optional_scalars.items():
        if iface.get(key):
            node[name] = iface[key]
    optional_lists = {
        "local-ipv4s": "local_ipv4s", "public-ipv4s": "public_ipv4s", "ipv6s": "ipv6s",
        "subnet-ipv6-cidr-blocks": "subnet_ipv6_cidr_blocks",
        "vpc-ipv4-cidr-blocks": "vpc_ipv4_cidr_blocks",
        "vpc-ipv6-cidr-blocks": "vpc_ipv6_cidr_blocks",
        "security-group-ids": "security_group_ids",
    }
    for name, key in optional_lists.items():
        if iface.get(key):
            node[name] = "\n".join(iface[key])
    if iface.get("vpc_ipv4_cidr_blocks"):
        node["vpc-ipv4-cidr-block"] = iface["vpc_ipv4_cidr_blocks"][0]  # the primary CIDR
    local = iface.get("local_ipv4s") or []
    public = iface.get("public_ipv4s") or []
    if local:
        node["local-hostname"] = iface.get("local_hostname") or private_hostname(state, local[0])
    if public:
        node["public-hostname"] = iface.get("public_hostname") or public_hostname(state, public[0])
        associations = iface.get("ipv4_associations") or {
            ip: (local[i] if i < len(local) else (local[0] if local else ""))
            for i, ip in enumerate(public)
        }
        node["ipv4-associations"] = dict(associations)  # <public-ip> -> its private IPv4
    return node


def build_tree(state: dict, version: str, delivery: str) -> dict:
    interfaces = state["interfaces"]
    primary = interfaces[0] if interfaces else {}
    local = primary.get("local_ipv4s") or []
    public = primary.get("public_ipv4s") or []
    ipv6 = primary.get("ipv6s") or []

    meta: dict = {
        "ami-id": state["ami_id"],
        "ami-launch-index": str(state["ami_launch_index"]),
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": {"ami": "/dev/xvda", "root": "/dev/xvda"},
        "instance-action": "none",
        "instance-id": state["instance_id"],
        "instance-life-cycle": "on-demand",
        "instance-type": state["instance_type"],
        "network": {"interfaces": {"macs": {
            iface["mac"]: interface_tree(state, iface) for iface in interfaces}}},
        "placement": {
            "availability-zone": state["availability_zone"],
            "availability-zone-id": state["availability_zone_id"],
        },
        "profile": "default-hvm",
        "reservation-id": state["reservation_id"],
        "security-groups": "\n".join(state["security_groups"]),
        "services": {"domain": derived_domain(state), "partition": state["partition"]},
    }
    if primary:
        meta["mac"] = primary["mac"]
    if local:
        meta["local-ipv4"] = local[0]
        meta["hostname"] = meta["local-hostname"] = (primary.get("local_hostname")
                                                     or private_hostname(state, local[0]))
    if public:
        # The primary ENI's first public IPv4 (EC2 UG "Instance metadata categories").
        meta["public-ipv4"] = public[0]
        meta["public-hostname"] = primary.get("public_hostname") or public_hostname(state, public[0])
    if ipv6 and version_has(version, SINCE_IPV6):
        # eth0's first IPv6, 404 if none (EC2 UG "Instance metadata categories").
        meta["ipv6"] = ipv6[0]
    if version_has(version, SINCE_PLACEMENT_REGION):
        meta["placement"]["region"] = state["region"]

    role = state["role"]
    creds = state["credentials"]
    if role is not None and version_has(version, SINCE_IAM):
        profile = state["instance_profile"] or role
        # IMDSv1 and IMDSv2 get different sets (EC2 API Reference, ModifyInstanceMetadataOptions,
        # HttpTokens).
        role_set = creds[delivery]
        last_updated = max(creds["v1"].get("LastUpdated", ""), creds["v2"].get("LastUpdated", ""))
        iam: dict = {
            # iam/info: present only with a role attached (EC2 UG "Instance metadata
            # categories"); the exact format 🟡 is from real-instance transcripts, not AWS docs.
            "info": aws_json({
                "Code": "Success",
                "LastUpdated": last_updated,
                "InstanceProfileArn":
                    f"arn:{state['partition']}:iam::{state['account_id']}:instance-profile/{profile}",
                "InstanceProfileId": state["instance_profile_id"] or profile_id(profile),
            }),
            "security-credentials": {role: credential_document(role_set, None)},
        }
        if state["extended"]:
            # Listed under iam/ (❓ no AWS document says whether iam/ listings include it).
            iam["security-credentials-extended"] = {
                role: credential_document(role_set, state["account_id"])}
        meta["iam"] = iam

    if version_has(version, SINCE_IDENTITY_CREDENTIALS):
        identity = creds["identity"]
        # ec2/info shape is ❓ (EC2 UG "Instance metadata categories" reserves it for internal
        # use and gives no format): Code, LastUpdated, AccountId.
        meta["identity-credentials"] = {"ec2": {
            "info": aws_json({"Code": "Success", "LastUpdated": identity.get("LastUpdated", ""),
                              "AccountId": state["account_id"]}),
            "security-credentials": {"ec2-instance": credential_document(identity, None)},
        }}

    # Key order and nulls as on real instances (EC2 UG "Instance identity documents").
    document = {
        "accountId": state["account_id"],
        "architecture": state["architecture"],
        "availabilityZone": state["availability_zone"],
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": state["ami_id"],
        "instanceId": state["instance_id"],
        "instanceType": state["instance_type"],
        "kernelId": None,
        "pendingTime": state["pending_time"],
        "privateIp": local[0] if local else None,
        "ramdiskId": None,
        "region": state["region"],
        "version": "2017-09-30",
    }
    # Only the document: pkcs7/signature/rsa2048 would need AWS's signing keys.
    tree: dict = {
        "dynamic": {"instance-identity": {"document": aws_json(document)}},
        "meta-data": meta,
    }
    if state["user_data"] is not None:
        # Listed only when configured; 404 otherwise (EC2 UG "Retrieve instance metadata",
        # Responses and error messages: 404 if the resource is not available).
        tree["user-data"] = state["user_data"].encode()
    return tree


def listing(directory: dict, mark_directories: bool = True) -> str:
    """Children, one per line (LF), sub-directories with a trailing '/' (EC2 UG "Retrieve
    instance metadata", Responses and error messages), no final newline (🟡 not stated by AWS).
    Sorted by name, as real listings are alphabetical."""
    return "\n".join(name + "/" if mark_directories and isinstance(child, dict) else name
                     for name, child in sorted(directory.items()))


def canonical_segments(target: str) -> tuple[list[str], bool]:
    """Request target -> (path segments, had trailing slash).

    Lenient on purpose (see the module docstring): an absolute-form target is reduced to its
    path, the query string is ignored and empty segments (from '//') are dropped."""
    if "://" in target.split("?", 1)[0]:
        target = urllib.parse.urlsplit(target).path or "/"
    path = target.split("?", 1)[0].split("#", 1)[0]
    return [s for s in path.split("/") if s], path.endswith("/")


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 500: "Internal Server Error",
}
# HTML titles of the error pages; 400 is "Missing or Invalid Parameters" (EC2 UG "Retrieve
# instance metadata", Responses and error messages).
ERROR_TITLES = {400: "Missing or Invalid Parameters"}


def reason(code: int) -> str:
    if code in REASONS:
        return REASONS[code]
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def error_page(code: int) -> bytes:
    """The XHTML error page IMDS serves, e.g. "404 - Not Found" (the code's name as in EC2 UG
    "Retrieve instance metadata", Responses and error messages; the XHTML body 🟡 is as seen on
    real instances, not documented by AWS)."""
    title = f"{code} - {ERROR_TITLES.get(code, reason(code))}"
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        ' <head>\n'
        f'  <title>{title}</title>\n'
        ' </head>\n'
        ' <body>\n'
        f'  <h1>{title}</h1>\n'
        ' </body>\n'
        '</html>\n'
    ).encode("iso-8859-1")


class Response:
    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                 headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


def ok(body: str | bytes, content_type: str = "text/plain") -> Response:
    return Response(200, body.encode() if isinstance(body, str) else body, content_type)


def fail(status: int, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, error_page(status), "text/html", headers)


class BaseHandler(standin.BaseHandler):
    """HTTP/1.1 with keep-alive and Content-Length on every response, so a pooling proxy can
    reuse connections (real IMDS is HTTP/1.0 + close, 🟡 reported from real instances, not in
    AWS docs; both must work through credlock).
    HTTP/1.0 requests get "Connection: close" and the connection is closed. IMDS clients never
    speak HTTP/0.9 either (standin.BaseHandler always sends a status line and headers)."""

    backend: Emulator  # set on the per-listener subclass

    def version_string(self) -> str:
        return SERVER_HEADER

    def discard_body(self) -> None:
        """Read and drop a request body so the next request on the connection parses cleanly.
        Chunked or oversized bodies are not worth parsing: answer, then close."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return
        self.read_body()  # standin.BaseHandler: Content-Length, up to 1 MiB

    def send(self, response: Response) -> None:
        if self.request_version == "HTTP/1.0":
            self.close_connection = True
        self.send_response(response.status, reason(response.status))
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers of GET, no body
            self.wfile.write(response.body)
        self.wfile.flush()

    @staticmethod
    def json_response(status: int, body: bytes) -> Response:
        return Response(status, body, "application/json")

    def send_error(self, code, message=None, explain=None) -> None:
        # Malformed requests (bad request line, oversized headers, ...): same HTML pages.
        self.close_connection = True
        self.send_response(code, reason(code))
        body = error_page(code)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)
        self.wfile.flush()


class ImdsHandler(BaseHandler):
    """One IMDS request -> one Response; all protocol decisions are in respond()."""

    def dispatch(self) -> None:
        self.discard_body()
        entry = self.record(self.path)  # the raw request target, exactly as received
        if self.delay_or_drop(entry):
            return
        response = self.respond_safely(self.respond, lambda: fail(500))
        self.backend.set_status(entry, response.status)
        self.send(response)

    def respond(self) -> Response:
        if self.command == "PUT":
            return self.respond_to_put()
        if self.command in ("GET", "HEAD"):
            return self.respond_to_get()
        # ❓ IMDS answering 405 to other methods is in no AWS document; SDKs expect it (AWS SDKs
        # and Tools Reference Guide, "IMDS credential provider": 403, 404, 405 -> IMDSv1).
        return fail(405, [("Allow", "GET, HEAD, PUT")])

    def respond_to_put(self) -> Response:
        segments, _ = canonical_segments(self.path)
        if segments != TOKEN_PATH.strip("/").split("/"):
            # /2021-03-23/api/token -> 403 by design (EC2 UG "Retrieve instance metadata",
            # Considerations). A PUT anywhere else is also 403 ❓ (no AWS document says): 403 is
            # "The request is not allowed" (same page, Responses and error messages), and SDKs
            # treat 403 on the token PUT as "IMDSv2 unavailable" (AWS SDKs and Tools Reference
            # Guide, "IMDS credential provider").
            return fail(403)
        if self.headers.get(FORWARDED_FOR_HEADER) is not None:
            # Rejected (EC2 UG "How Instance Metadata Service Version 2 works"); the code is ❓:
            # that page gives none, so 403, the documented code for "The request is not allowed".
            return fail(403)
        ttl_values = self.headers.get_all(TTL_HEADER) or []
        if len(ttl_values) != 1:  # missing, or ambiguous duplicates
            return fail(400)
        ttl_text = ttl_values[0].strip()
        if not ttl_text.isdigit() or not TTL_MIN_SECONDS <= int(ttl_text) <= TTL_MAX_SECONDS:
            # "Missing or Invalid Parameters" (EC2 UG "Retrieve instance metadata", Responses and
            # error messages)
            return fail(400)
        ttl = int(ttl_text)
        token = self.backend.issue_token(ttl)
        response = ok(token)
        # Rust's SDK requires it (smithy-rs aws-config src/imds/client/token.rs,
        # parse_token_response).
        response.headers.append((TTL_HEADER, str(ttl)))
        return response

    def respond_to_get(self) -> Response:
        token = self.headers.get(TOKEN_HEADER)
        _, _, tokens_mode = self.backend.runtime()
        if token is not None:
            if not self.backend.token_valid(token.strip()):
                # Invalid or expired token (EC2 UG "Retrieve instance metadata", Responses and
                # error messages).
                return fail(401)
            delivery = "v2"
        elif tokens_mode == "required":
            # HttpTokens=required and no token (EC2 UG "How Instance Metadata Service Version 2
            # works").
            return fail(401)
        else:
            delivery = "v1"

        segments, _ = canonical_segments(self.path)
        if not segments:
            # GET / lists the versions (EC2 UG "Retrieve instance metadata").
            return ok("\n".join(VERSIONS))
        version, rest = segments[0], segments[1:]
        if version not in VERSIONS:
            return fail(404)
        if rest[:2] == ["api", "token"]:
            # ❓ GET/HEAD of the token path: only PUT is allowed there.
            return fail(405, [("Allow", "PUT")])
        node = self.backend.tree(version, delivery)
        for segment in rest:
            if not isinstance(node, dict) or segment not in node:
                return fail(404)
            node = node[segment]
        # A trailing slash does not matter: a directory lists itself with or without it (200,
        # never a redirect), and a leaf is served with it too (…/<role>/ returns the
        # credentials). 🟡 No AWS document covers trailing slashes: real IMDS was reported to
        # answer 301 in 2017-18 and 200 for both forms by 2022 (e.g.
        # github.com/awslabs/aws-sdk-rust/issues/560).
        if isinstance(node, dict):
            # Real IMDS lists /<version>/ as "dynamic", "meta-data", "user-data" with no '/'
            # (the one listing that does not mark directories, like GET / listing versions).
            return ok(listing(node, mark_directories=bool(rest)))
        if isinstance(node, bytes):  # user-data is arbitrary bytes (🟡 real IMDS: octet-stream)
            return ok(node, "application/octet-stream")
        return ok(node)


class ControlHandler(standin.ControlAPI, BaseHandler):
    """The JSON control API (module docstring). Separate socket, so the IMDS listeners never
    expose it and tests can steer the emulator while a proxy sits in front of it."""

    json_body_checked_first = False  # only POST /state reads the body

    def route(self, method: str, path: str):
        if (method, path) == ("POST", "/rotate"):
            self.backend.rotate()
            return self.backend.snapshot()
        if (method, path) == ("POST", "/tokens/clear"):
            self.backend.clear_tokens()
            return {"cleared": True}
        return super().route(method, path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def load_instance(path: str | None) -> dict:
    instance = copy.deepcopy(DEFAULT_INSTANCE)
    if path is None:
        return instance
    with open(path, encoding="utf-8") as file:
        overrides = json.load(file)
    if not isinstance(overrides, dict):
        raise ValidationError("the instance file must hold a JSON object")
    # Keys starting with "_" are comments (JSON has none); any other unknown key is a typo.
    overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
    unknown = set(overrides) - set(DEFAULT_INSTANCE)
    if unknown:
        raise ValidationError(f"unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_INSTANCE)}")
    instance.update(overrides)
    return instance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Faithful local EC2 IMDS emulator (see the module docstring).")
    standin.add_listen_argument(parser, "IMDS")
    parser.add_argument("--tokens", choices=("optional", "required"), default="optional",
                        help="HttpTokens: whether IMDSv1 (tokenless) requests are allowed")
    parser.add_argument("--instance", metavar="FILE.json",
                        help="JSON object overriding the default instance (see DEFAULT_INSTANCE)")
    standin.add_control_argument(parser)
    args = parser.parse_args(argv)

    try:
        instance = load_instance(args.instance)
        validate_state({**instance, **DEFAULT_RUNTIME, "tokens": args.tokens,
                        "credentials": {name: {} for name in CREDENTIAL_SETS}})
    except (OSError, ValueError) as err:
        parser.error(f"--instance: {err}")
    emulator = Emulator(instance, args.tokens)

    # ":PORT" (all interfaces) has always been accepted here.
    return standin.serve(parser, args, "imds_emulator", ImdsHandler, ControlHandler, emulator,
                         allow_empty_host=True)


if __name__ == "__main__":
    sys.exit(main())
