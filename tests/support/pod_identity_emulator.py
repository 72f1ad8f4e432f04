#!/usr/bin/env python3
"""A faithful local stand-in for the Amazon EKS Pod Identity Agent (the node agent at
169.254.170.23 / [fd00:ec2::23], port 80) together with the EKS Auth AssumeRoleForPodIdentity
call behind it, for credlock's Pod Identity tests.

Standard library only (Python 3.11). Same CLI shape and control conventions as imds_emulator.py
(standin.py holds them):

    python3 pod_identity_emulator.py --listen 127.0.0.1:0 [--listen [::1]:0]
        [--control 127.0.0.1:0] [--cluster-name NAME] [--target-host HOST ...]

It prints one line per bound socket, agent listeners first, flushed, then serves until
SIGTERM/SIGINT (exit 0). A bad address is a usage error (exit 2); a failed bind exits 1.

    listening 127.0.0.1:41234
    control 127.0.0.1:41236

Sources. AWS documents the happy path; the error shapes come from the agent's published source,
github.com/aws/eks-pod-identity-agent (snapshot of 2026-03-17, commit d4dc0f3f, Go 1.26):
  [EKS-how]   Amazon EKS User Guide, "How EKS Pod Identity works" (docs.aws.amazon.com/eks/latest/
              userguide/pod-id-how-it-works.html; awsdocs/amazon-eks-user-guide
              doc_source/pod-id-how-it-works.md): the pod gets
              AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials and
              AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/var/run/secrets/pods.eks.amazonaws.com/
              serviceaccount/eks-pod-identity-token, a projected service-account token with
              audience pods.eks.amazonaws.com and expirationSeconds 86400.
  [EKS-pid]   Amazon EKS User Guide, "Learn how EKS Pod Identity grants pods access to AWS
              services", "EKS Pod Identity considerations": the agent uses hostNetwork, port 80
              on 169.254.170.23 (IPv4) and [fd00:ec2::23] (IPv6).
  [EKS-auth]  Amazon EKS API Reference, "AssumeRoleForPodIdentity" (Errors: HTTP status of each
              exception; as modelled in botocore data eks-auth/2023-11-26/service-2.json).
  [handler]   pkg/handlers/eks_credential_handler.go (route /v1/credentials, Authorization header,
              http.Error on failure, JSON answer)
  [model]     pkg/credentials/model.go (EksCredentialsResponse: AccessKeyId, SecretAccessKey,
              Token, AccountId, Expiration, all omitempty; Expiration as RFC3339Nano)
  [valid]     internal/validation/request.go (target-host check, token checks)
  [errors]    pkg/errors/errors.go (HandleCredentialFetchingError: status and message shapes)
  [service]   internal/cloud/eksauth/service.go (AccountId parsed from the assumed-role ARN)
  [cache]     internal/credsretriever/refreshing_cache.go (defaultMinCredentialTtl = 15 s)
  [server]    pkg/server/server.go, internal/middleware/rate_limiter/rate_limiter.go,
              configuration/config.go (RequestRate 1000, burst 500, per listener)
  [jwt]       github.com/golang-jwt/jwt v5.2.2 (go.mod): parser.go ParseUnverified, splitToken,
              DecodeSegment (base64 RawURLEncoding), errors.go, validator.go (exp, nbf)

Rules implemented (agent listener), in the agent's order:
  1. Only the path /v1/credentials exists ([handler] ConfigureHandler); other paths -> 404
     "404 page not found\\n" (Go ServeMux). An unclean path ("//v1/credentials") -> 301 to the
     cleaned one (ServeMux; GET gets Go's small HTML body). Every method is accepted (the pattern
     has no method), HEAD without a body.
  2. Rate limit, one limiter per listener: 1000 requests/s, burst 500 ([server]) -> 429
     "Too Many Requests\\n". Control "rate_limit": {"rate", "burst"} or null.
  3. Target host ([valid] validateRequestTargetHost): the Host header, port and [] stripped, must
     be 169.254.170.23 or fd00:ec2::23 (or the --target-host values, the validator's TargetHosts)
     -> else 403 "Access Denied. Called agent through invalid address, please use either
     [169.254.170.23 fd00:ec2::23] address not 127.0.0.1\\n". A proxy in front of the agent must
     therefore keep the link-local Host.
  4. Authorization ([handler] req.Header.Get("Authorization"), the raw token, no "Bearer"):
     empty or missing -> 400 "Service account token cannot be empty\\n".
  5. The token must parse as a JWT, unverified ([valid] validateToken, [jwt]): -> 400
     "Service account token cannot be parsed: token is malformed: token contains an invalid
     number of segments" / "...: could not base64 decode header: illegal base64 data at input
     byte N" / "...could not JSON decode header: ..." / claim likewise / "token is unverifiable:
     signing method (alg) is unspecified|unavailable". The text after the last documented colon
     (Go's base64/JSON error detail) is approximated.
  6. Basic claims ([valid], [jwt] Validator): exp in the past -> 400 "Service account token
     failed basic claim validations: token is expired"; nbf in the future -> "...token is not
     valid yet" (both: joined with ", "). The signature is never checked by the agent.
  7. EKS Auth (emulated): a token registered through the control API maps to a pod identity
     association; any other token gets the service's error. Service errors come back with EKS
     Auth's HTTP status ([EKS-auth]: InvalidTokenException, ExpiredTokenException,
     AccessDeniedException, InvalidRequestException, InvalidParameterException 400,
     ResourceNotFoundException 404, ThrottlingException 429, InternalServerException 500,
     ServiceUnavailableException 503) and the body "[<request-id>]: (<Code>): <message>, fault:
     client|server\\n" ([errors] HandleCredentialFetchingError). ❓ Which exception and message
     EKS Auth returns for an unknown token is not documented: InvalidTokenException with "The
     specified Kubernetes service account token is invalid." (its API-reference description);
     control "unknown_token_error" changes it.
  8. Credentials expiring within 15 s -> 500 "fetched credentials are expired or will expire
     within the next N.NN seconds\\n" ([cache] callDelegateAndCache).
  9. Success ([handler], [model], [service]): 200, Content-Type application/json, compact JSON
     {"AccessKeyId","SecretAccessKey","Token","AccountId","Expiration"} in that order, empty
     fields omitted, no Code/Type/LastUpdated/RoleArn, no trailing newline; AccountId is the
     account of the role; Expiration RFC 3339 UTC ("...Z"). The answer for a token is stable until
     rotated, as the agent caches per token ([cache]); the cache's timing (3 h renewal) is not
     emulated. ❓ Lifetime 6 h by default (EKS Auth's is undocumented); "lifetime_s" changes it.
  * HTTP/1.1 without a Host header -> Go's 400 "Bad Request: missing required Host header".

Raw-credential markers: AccessKeyId is 20 characters of [A-Z0-9] starting with "ASIARAWP",
SecretAccessKey is 40 characters containing "RAWSECRET", Token contains "RAWTOKEN" (RAW_MARKERS).

Control API (JSON, only on the --control listener):
  GET  /state               tokens (association, pod, served document or error), target_hosts,
                            cluster_name, delay_ms, down, rate_limit, unknown_token_error
  POST /state               merge: delay_ms, down, rate_limit ({rate, burst} | null),
                            target_hosts ([host, ...]), unknown_token_error ({code, message?})
  POST /tokens              register a token: {"token"?: default a freshly minted JWT,
                            "namespace"?, "service_account"?, "pod_name"?, "pod_uid"?,
                            "role_arn"?, "lifetime_s"?, "exp"?: epoch s | null, "nbf"?: epoch s,
                            "document"?: {field: string | null}, "error"?: {"code", "message"?}}
                            -> the entry (token, association_id, role_arn, document, ...). A minted
                            JWT looks like a projected service-account token ([EKS-how]).
  POST /tokens/rotate       {"token"}: a new raw set for the same association
  POST /tokens/remove       {"token"}: EKS Auth no longer knows it
  GET  /requests            the last 1000 agent requests (method, path, version, headers, client,
                            listener, status, time)
  POST /requests/clear      forget them
  POST /reset               back to the start-up state
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import datetime
import json
import re
import secrets
import string
import sys
import time
import urllib.parse
import uuid

import standin
from standin import (RAW_MARKERS, Backend, Response, TokenBucket, ValidationError,  # noqa: F401
                     check_keys, check_runtime_keys, format_address, go_http_error, go_json,
                     json_kind, random_chars, raw_secrets)

RAW_ACCESS_KEY_PREFIX = "ASIARAWP"

ACCOUNT_ID = "123456789012"
DEFAULT_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/credlock-pod-role"
DEFAULT_CLUSTER = "credlock-test-cluster"
DEFAULT_TARGET_HOSTS = ["169.254.170.23", "fd00:ec2::23"]  # configuration/config.go
DEFAULT_LIFETIME_S = 6 * 3600  # ❓ (module docstring, rule 9)
TOKEN_LIFETIME_S = 86400  # [EKS-how] expirationSeconds: 86400
AUDIENCE = "pods.eks.amazonaws.com"  # [EKS-how]
MIN_CREDENTIAL_TTL_S = 15  # [cache] defaultMinCredentialTtl
CREDENTIALS_PATH = "/v1/credentials"  # [handler]
DOCUMENT_KEYS = ("AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration")  # [model]
DEFAULT_RATE_LIMIT = {"rate": 1000, "burst": 500}  # [server] RequestRate, burst rate/2

# [EKS-auth] AssumeRoleForPodIdentity errors -> (HTTP status, smithy fault)
EKS_AUTH_ERRORS = {
    "ThrottlingException": (429, "client"),
    "InvalidRequestException": (400, "client"),
    "AccessDeniedException": (400, "client"),
    "InternalServerException": (500, "server"),
    "InvalidTokenException": (400, "client"),
    "InvalidParameterException": (400, "client"),
    "ExpiredTokenException": (400, "client"),
    "ResourceNotFoundException": (404, "client"),
    "ServiceUnavailableException": (503, "server"),
}
# The API reference's description of each exception, used as the default message (❓).
EKS_AUTH_MESSAGES = {
    "ThrottlingException": "The request was denied because your request rate is too high. "
                           "Reduce the frequency of requests.",
    "InvalidRequestException": "This exception is thrown if the request contains a semantic "
                               "error.",
    "AccessDeniedException": "You don't have permissions to perform the requested operation.",
    "InternalServerException": "These errors are usually caused by a server-side issue.",
    "InvalidTokenException": "The specified Kubernetes service account token is invalid.",
    "InvalidParameterException": "The specified parameter is invalid.",
    "ExpiredTokenException": "The specified Kubernetes service account token is expired.",
    "ResourceNotFoundException": "The specified resource could not be found.",
    "ServiceUnavailableException": "The service is unavailable. Back off and retry the "
                                   "operation.",
}
DEFAULT_UNKNOWN_TOKEN_ERROR = {"code": "InvalidTokenException"}

# [jwt] signing methods registered by golang-jwt v5 (GetSigningMethod)
KNOWN_ALGS = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
              "PS256", "PS384", "PS512", "EdDSA", "none"}


# --------------------------------------------------------------------------------------------
# Helpers (the ones every stand-in shares, and Go's answers, are in standin.py)
# --------------------------------------------------------------------------------------------

def rfc3339_nano(epoch: float) -> str:
    """Go's time.Format(time.RFC3339Nano) of a UTC time: fraction without trailing zeros."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += ("." + f"{moment.microsecond:06d}").rstrip("0")
    return text + "Z"


def raw_credentials(lifetime_s: int, account_id: str) -> dict:
    return {**raw_secrets(RAW_ACCESS_KEY_PREFIX), "AccountId": account_id,
            "Expiration": rfc3339_nano(int(time.time()) + lifetime_s)}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(namespace: str, service_account: str, pod_name: str, pod_uid: str,
             exp: int | None, nbf: int | None, cluster: str) -> str:
    """A token shaped like a projected service-account token ([EKS-how]); the signature is
    random bytes (the agent never verifies it, [valid])."""
    now = int(time.time())
    header = {"alg": "RS256", "kid": secrets.token_hex(20)}
    claims = {
        "aud": [AUDIENCE],
        "iat": now,
        "iss": f"https://oidc.eks.us-east-1.amazonaws.com/id/{secrets.token_hex(16).upper()}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": pod_name, "uid": pod_uid},
            "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            "cluster": cluster,
        },
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    if exp is not None:
        claims["exp"] = exp
    if nbf is not None:
        claims["nbf"] = nbf
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(secrets.token_bytes(256))])


def go_split_host_port(hostport: str) -> str | None:
    """net.SplitHostPort's host, or None where Go returns an error."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1:].startswith(":") or "]" in hostport[end + 1:]:
            return None
        return hostport[1:end]
    host, sep, _ = hostport.rpartition(":")
    if not sep or ":" in host:
        return None
    return host


# --------------------------------------------------------------------------------------------
# Token checks of the agent ([valid], [jwt])
# --------------------------------------------------------------------------------------------

class TokenRejected(Exception):
    pass


BASE64URL = set(string.ascii_letters + string.digits + "-_")


def decode_segment(segment: str) -> bytes:
    """base64.RawURLEncoding.DecodeString with Go's error text."""
    for index, char in enumerate(segment):
        if char not in BASE64URL:
            raise TokenRejected(f"illegal base64 data at input byte {index}")
    if len(segment) % 4 == 1:
        raise TokenRejected(f"illegal base64 data at input byte {len(segment) - 1}")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as err:  # pragma: no cover - excluded above
        raise TokenRejected(str(err)) from None


def go_json_error(data: bytes, err: Exception) -> str:
    """An approximation of encoding/json's error text (module docstring, rule 5)."""
    if not data.strip():
        return "unexpected end of JSON input"
    if isinstance(err, json.JSONDecodeError):
        if err.pos >= len(err.doc.rstrip()):
            return "unexpected end of JSON input"
        return f"invalid character {err.doc[err.pos]!r} looking for beginning of value"
    return str(err)


def decode_claims(data: bytes) -> dict:
    """json.Unmarshal into jwt.RegisteredClaims: typed fields, names matched case-insensitively."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenRejected(go_json_error(data, err)) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenRejected(f"json: cannot unmarshal {json_kind(value)} into Go value of type "
                            "jwt.RegisteredClaims")
    fields = {"iss": "Issuer", "sub": "Subject", "aud": "Audience", "exp": "ExpiresAt",
              "nbf": "NotBefore", "iat": "IssuedAt", "jti": "ID"}
    claims: dict = {}
    for key, item in value.items():
        name = key if key in fields else next((f for f in fields if f == key.lower()), None)
        if name is None:
            continue
        if name in ("iss", "sub", "jti"):
            if item is not None and not isinstance(item, str):
                raise TokenRejected(f"json: cannot unmarshal {json_kind(item)} into Go struct "
                                    f"field RegisteredClaims.{name} of type string")
        elif name == "aud":
            if item is not None and not isinstance(item, str) and not (
                    isinstance(item, list) and all(isinstance(a, str) for a in item)):
                raise TokenRejected("invalid type for claim")
        elif item is not None and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise TokenRejected(f"could not parse NumericData: json: cannot unmarshal "
                                f"{json_kind(item)} into Go value of type json.Number")
        claims[name] = item
    return claims


def check_token(token: str, now: float) -> None:
    """The agent's validateToken ([valid]), raising TokenRejected with the 400 message."""
    if token == "":
        raise TokenRejected("Service account token cannot be empty")
    prefix = "Service account token cannot be parsed: "
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected(prefix + "token is malformed: token contains an invalid number of "
                                     "segments")
    try:
        header_bytes = decode_segment(parts[0])
    except TokenRejected as err:
        raise TokenRejected(prefix + f"token is malformed: could not base64 decode header: {err}")
    try:
        header = json.loads(header_bytes)
        if header is not None and not isinstance(header, dict):
            raise TokenRejected(f"json: cannot unmarshal {json_kind(header)} into Go value of "
                                "type map[string]interface {}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenRejected(prefix + "token is malformed: could not JSON decode header: "
                            + go_json_error(header_bytes, err)) from None
    except TokenRejected as err:
        raise TokenRejected(prefix + f"token is malformed: could not JSON decode header: {err}")
    try:
        claim_bytes = decode_segment(parts[1])
    except TokenRejected as err:
        raise TokenRejected(prefix + f"token is malformed: could not base64 decode claim: {err}")
    try:
        claims = decode_claims(claim_bytes)
    except TokenRejected as err:
        raise TokenRejected(prefix + f"token is malformed: could not JSON decode claim: {err}")
    alg = (header or {}).get("alg")
    if not isinstance(alg, str):
        raise TokenRejected(prefix + "token is unverifiable: signing method (alg) is unspecified")
    if alg not in KNOWN_ALGS:
        raise TokenRejected(prefix + "token is unverifiable: signing method (alg) is unavailable")
    # [jwt] Validator.Validate: exp then nbf, times truncated to whole seconds.
    problems = []
    if claims.get("exp") is not None and not now < int(claims["exp"] // 1):
        problems.append("token is expired")
    if claims.get("nbf") is not None and now < int(claims["nbf"] // 1):
        problems.append("token is not valid yet")
    if problems:
        raise TokenRejected("Service account token failed basic claim validations: "
                            + ", ".join(problems))


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def validate_error_spec(spec) -> None:
    if not isinstance(spec, dict) or set(spec) - {"code", "message"} or \
            spec.get("code") not in EKS_AUTH_ERRORS or \
            not isinstance(spec.get("message", ""), str):
        raise ValidationError(f"an error is {{\"code\": one of {sorted(EKS_AUTH_ERRORS)}, "
                              "\"message\"?: string}")


class Agent(Backend):
    def __init__(self, cluster_name: str, target_hosts: list[str]):
        super().__init__()
        self.cluster_name = cluster_name
        self.initial_target_hosts = list(target_hosts)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.tokens: dict[str, dict] = {}
            self.target_hosts = list(self.initial_target_hosts)
            self.delay_ms = 0
            self.down = False
            self.rate_limit = copy.deepcopy(DEFAULT_RATE_LIMIT)
            self.unknown_token_error = copy.deepcopy(DEFAULT_UNKNOWN_TOKEN_ERROR)
            self.buckets: dict[str, TokenBucket] = {}
            self.requests.clear()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "tokens": copy.deepcopy(self.tokens),
                "cluster_name": self.cluster_name,
                "target_hosts": list(self.target_hosts),
                "delay_ms": self.delay_ms,
                "down": self.down,
                "rate_limit": copy.deepcopy(self.rate_limit),
                "unknown_token_error": copy.deepcopy(self.unknown_token_error),
            }

    def merge(self, patch) -> dict:
        check_keys(patch, {"delay_ms", "down", "rate_limit", "target_hosts",
                           "unknown_token_error"}, list_allowed=True)
        check_runtime_keys(patch)
        if "rate_limit" in patch and patch["rate_limit"] is not None:
            limit = patch["rate_limit"]
            if not isinstance(limit, dict) or set(limit) != {"rate", "burst"} or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                    for v in limit.values()):
                raise ValidationError("rate_limit must be null or {\"rate\": N, \"burst\": N}")
        if "target_hosts" in patch:
            hosts = patch["target_hosts"]
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ValidationError("target_hosts must be a list of strings")
        if "unknown_token_error" in patch:
            validate_error_spec(patch["unknown_token_error"])
        with self.lock:
            for key, value in patch.items():
                setattr(self, key, copy.deepcopy(value))
            self.buckets.clear()
        return self.snapshot()

    def register(self, spec) -> dict:
        check_keys(spec, {"token", "namespace", "service_account", "pod_name", "pod_uid",
                          "role_arn", "lifetime_s", "exp", "nbf", "document", "error"})
        strings = {"namespace": "default", "service_account": "credlock-sa",
                   "pod_name": "credlock-pod-" + secrets.token_hex(3),
                   "pod_uid": str(uuid.uuid4()), "role_arn": DEFAULT_ROLE_ARN}
        values = {}
        for key, default in strings.items():
            values[key] = spec.get(key, default)
            if not isinstance(values[key], str) or not values[key]:
                raise ValidationError(f"{key} must be a non-empty string")
        match = re.fullmatch(r"arn:[^:]+:iam::(\d{12}):role/.+", values["role_arn"])
        if not match:
            raise ValidationError("role_arn must be arn:<partition>:iam::<12 digits>:role/<name>")
        account_id = match.group(1)
        lifetime = spec.get("lifetime_s", DEFAULT_LIFETIME_S)
        if isinstance(lifetime, bool) or not isinstance(lifetime, int):
            raise ValidationError("lifetime_s must be an integer")
        now = int(time.time())
        exp = spec.get("exp", now + TOKEN_LIFETIME_S)
        nbf = spec.get("nbf")
        for key, value in (("exp", exp), ("nbf", nbf)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValidationError(f"{key} must be an integer epoch or null")
        overrides = spec.get("document", {})
        if not isinstance(overrides, dict) or set(overrides) - set(DOCUMENT_KEYS) or not all(
                v is None or isinstance(v, str) for v in overrides.values()):
            raise ValidationError(f"document maps fields among {list(DOCUMENT_KEYS)} to strings "
                                  "or null")
        error = spec.get("error")
        if error is not None:
            validate_error_spec(error)
        token = spec.get("token")
        if token is None:
            token = mint_jwt(values["namespace"], values["service_account"], values["pod_name"],
                             values["pod_uid"], exp, nbf, self.cluster_name)
        if not isinstance(token, str) or not token:
            raise ValidationError("token must be a non-empty string")
        association_id = "a-" + random_chars(string.ascii_lowercase + string.digits, 17)
        document = raw_credentials(lifetime, account_id)
        for key, value in overrides.items():
            if value is None:
                document.pop(key, None)  # omitempty: an empty field is left out
            else:
                document[key] = value
        entry = {
            "token": token,
            **values,
            "account_id": account_id,
            "cluster_name": self.cluster_name,
            "association_id": association_id,
            "association_arn": f"arn:aws:eks:us-east-1:{account_id}:podidentityassociation/"
                               f"{self.cluster_name}/{association_id}",
            "lifetime_s": lifetime,
            "document": {k: document[k] for k in DOCUMENT_KEYS if document.get(k)},
            "error": copy.deepcopy(error),
        }
        with self.lock:
            self.tokens[token] = entry
        return copy.deepcopy(entry)

    def rotate(self, token) -> dict:
        with self.lock:
            entry = self.tokens.get(token) if isinstance(token, str) else None
            if entry is None:
                raise standin.ControlError(404, "no such token")
            fresh = raw_credentials(entry["lifetime_s"], entry["account_id"])
            entry["document"] = {k: fresh[k] for k in DOCUMENT_KEYS}
            return copy.deepcopy(entry)

    def remove(self, token) -> bool:
        with self.lock:
            return self.tokens.pop(token, None) is not None if isinstance(token, str) else False

    def lookup(self, token: str) -> tuple[dict | None, dict]:
        with self.lock:
            return copy.deepcopy(self.tokens.get(token)), copy.deepcopy(self.unknown_token_error)

    def targets(self) -> list[str]:
        with self.lock:
            return list(self.target_hosts)

    def rate_allowed(self, listener: str) -> bool:
        with self.lock:
            if self.rate_limit is None:
                return True
            bucket = self.buckets.get(listener)
            if bucket is None:
                bucket = self.buckets[listener] = TokenBucket(
                    self.rate_limit["rate"], int(self.rate_limit["burst"]))
            return bucket.allow()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

class AgentHandler(standin.GoRouterHandler):
    """Go's net/http framing and ServeMux's path handling (rule 1); the agent ignores request
    bodies."""

    def request_host(self) -> str:
        """Go's Request.Host: the Host header, or the authority of an absolute target."""
        if self.raw_target().startswith(("http://", "https://")):
            return urllib.parse.urlsplit(self.raw_target()).netloc
        return (self.headers.get("Host") or "").strip()

    def redirect(self, location: str, query: str, has_query: bool) -> Response:
        # net/http ServeMux: 301 to the cleaned path, query kept; Go's body on GET only.
        location += "?" + query if has_query and query else ""
        headers = [("Location", location)]
        body = b""
        if self.command in ("GET", "HEAD"):  # net/http.Redirect
            headers.append(("Content-Type", "text/html; charset=utf-8"))
            body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
        return Response(301, body, headers)

    def serve_path(self, path: str, query: str) -> Response:
        if path != CREDENTIALS_PATH:
            return go_http_error(404, "404 page not found")
        # One limiter per listener ([server]).
        if not self.backend.rate_allowed(format_address(*self.server.server_address[:2])):
            return go_http_error(429, "Too Many Requests")
        return self.credentials()

    def credentials(self) -> Response:
        # 3. target host ([valid] validateRequestTargetHost)
        host = self.request_host()
        stripped = go_split_host_port(host)
        if stripped is not None:
            host = stripped
        if len(host) > 1 and host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        targets = self.backend.targets()
        if host not in targets:
            return go_http_error(403, "Access Denied. Called agent through invalid address, "
                                      f"please use either [{' '.join(targets)}] address not {host}")
        # 4-6. token ([valid] validateToken)
        token = (self.headers.get("Authorization") or "").strip()
        try:
            check_token(token, time.time())
        except TokenRejected as err:
            return go_http_error(400, str(err))
        # 7. EKS Auth AssumeRoleForPodIdentity (emulated)
        entry, unknown_error = self.backend.lookup(token)
        error = unknown_error if entry is None else entry["error"]
        if error is not None:
            status, fault = EKS_AUTH_ERRORS[error["code"]]
            message = error.get("message", EKS_AUTH_MESSAGES[error["code"]])
            return go_http_error(status, f"[{uuid.uuid4()}]: ({error['code']}): {message}, "
                                         f"fault: {fault}")
        document = entry["document"]
        # 8. [cache] credentials that expire within 15 s are refused
        expiration = document.get("Expiration")
        if expiration:
            try:
                moment = datetime.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
                remaining = moment.timestamp() - time.time()
                if remaining <= MIN_CREDENTIAL_TTL_S:
                    return go_http_error(500, "fetched credentials are expired or will expire "
                                              f"within the next {remaining:.2f} seconds")
            except ValueError:
                pass  # a test's deliberately odd string is served as is
        # 9. the answer ([model]: omitempty, this order)
        body = go_json({k: document[k] for k in DOCUMENT_KEYS if document.get(k)})
        return Response(200, body.encode(), [("Content-Type", "application/json")])


class ControlHandler(standin.ControlAPI, standin.GoHandler):
    def route(self, method: str, path: str):
        if (method, path) == ("POST", "/tokens"):
            return self.backend.register(self.payload())
        if (method, path) == ("POST", "/tokens/rotate"):
            return self.backend.rotate(self.field("token"))
        if (method, path) == ("POST", "/tokens/remove"):
            return {"removed": self.backend.remove(self.field("token"))}
        return super().route(method, path)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local stand-in for the EKS Pod Identity Agent (see the module docstring).")
    standin.add_listen_argument(parser, "agent")
    standin.add_control_argument(parser)
    parser.add_argument("--cluster-name", default=DEFAULT_CLUSTER,
                        help="the agent's --cluster-name (default %(default)s)")
    parser.add_argument("--target-host", action="append", metavar="HOST",
                        help="accepted Host value, repeatable (default 169.254.170.23 and "
                             "fd00:ec2::23, as the real agent)")
    args = parser.parse_args(argv)
    agent = Agent(args.cluster_name, args.target_host or DEFAULT_TARGET_HOSTS)
    return standin.serve(parser, args, "pod_identity_emulator", AgentHandler, ControlHandler,
                         agent)


if __name__ == "__main__":
    sys.exit(main())
