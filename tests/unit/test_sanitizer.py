"""The sanitizer: secrets out, benign text kept, one line, bounded, never raises, idempotent."""

from __future__ import annotations

import string
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsrun_core.sanitize import DEFAULT_MAX_LENGTH, REDACTED, sanitize_message

JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9"
    ".eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20iLCJ0aWQiOiJ0LTEifQ"
    ".Zm9vYmFyYmF6cXV4c2lnbmF0dXJl"
)
JWT_PARTS = JWT.split(".")
GITHUB_TOKEN = "ghs_16C7e42F292c6912E7710c838347Ae178B4a"
PEM_BODY_1 = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"
PEM_BODY_2 = "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK"

# (message, secrets that must be gone, benign fragments that must be kept, as they read after
# folding whitespace). Realistic shapes: what requests, httpx, psycopg, SQLAlchemy, Graph, AWS,
# GitHub, Slack and Stripe clients put in their exceptions.
CORPUS: list[tuple[str, list[str], list[str]]] = [
    # --- HTTP clients -----------------------------------------------------------------------------
    (
        "401 Client Error: Unauthorized for url: https://graph.microsoft.com/v1.0/deviceManagement"
        "/deviceConfigurations?access_token=EwBwA8l6BAAURSNq&$top=50",
        ["EwBwA8l6BAAURSNq"],
        [
            "401 Client Error: Unauthorized for url: https://graph.microsoft.com/v1.0/",
            "?access_token=[REDACTED]&$top=50",
        ],
    ),
    (
        "Request headers: {'User-Agent': 'python-requests/2.31.0', 'Accept-Encoding': 'gzip, "
        f"deflate', 'Accept': '*/*', 'Connection': 'keep-alive', 'Authorization': 'Bearer {JWT}'}}",
        JWT_PARTS,
        ["'User-Agent': 'python-requests/2.31.0'", "'Authorization': '[REDACTED]'}"],
    ),
    (
        "Client error '403 Forbidden' for url 'https://api.github.com/repos/acme/app/hooks'\n"
        "For more information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/403",
        [],
        [
            "Client error '403 Forbidden' for url 'https://api.github.com/repos/acme/app/hooks' "
            "For more information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/403"
        ],
    ),
    (
        "httpx.HTTPStatusError: headers={'authorization': 'token ghp_16C7e42F292c6912E7710c838347"
        "Ae178B4a', 'accept': 'application/vnd.github+json'}",
        ["ghp_16C7", "16C7e42F292c6912E7710c838347Ae178B4a"],
        ["'accept': 'application/vnd.github+json'"],
    ),
    (
        f"GET /v1.0/users HTTP/1.1\r\nHost: graph.microsoft.com\r\nAuthorization: Bearer {JWT}\r\n"
        "Accept: application/json\r\n",
        JWT_PARTS,
        ["GET /v1.0/users HTTP/1.1 Host: graph.microsoft.com", "Accept: application/json"],
    ),
    (
        f"429 Too Many Requests: Retry-After: 30; sent Authorization: Bearer {JWT}; "
        "client_secret=8Q~abc.DEF_ghi-123 grant_type=client_credentials",
        [*JWT_PARTS, "8Q~abc.DEF_ghi-123"],
        ["429 Too Many Requests: Retry-After: 30;", "grant_type=client_credentials"],
    ),
    (
        f"throttled (429) calling graph with Bearer {JWT} for workspace w-7, retry in 12s",
        JWT_PARTS,
        ["throttled (429) calling graph with Bearer [REDACTED]", "workspace w-7, retry in 12s"],
    ),
    (
        "POST https://login.microsoftonline.com/t-1/oauth2/v2.0/token body: grant_type=client_"
        "credentials&client_id=1111&client_secret=8Q8~aBcDeFgHiJ&scope=https%3A%2F%2Fgraph.micr"
        "osoft.com%2F.default",
        ["8Q8~aBcDeFgHiJ"],
        ["client_id=1111&client_secret=[REDACTED]&scope=https%3A%2F%2Fgraph.microsoft.com%2F"],
    ),
    (
        "calling graph with Bearer ya29.a0AfH6SMBx-abc_def and 3 retries",
        ["ya29.a0AfH6SMBx-abc_def"],
        ["calling graph with Bearer [REDACTED] and 3 retries"],
    ),
    (
        "proxy returned 407; sent Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l",
        ["YWxhZGRpbjpvcGVuc2VzYW1l"],
        ["proxy returned 407; sent Proxy-Authorization: [REDACTED]"],
    ),
    (
        "upstream rejected: Cookie: ASP.NET_SessionId=abc123def456; .AspNet.Cookies=CfDJ8Nabc; "
        "theme=dark\nUser-Agent: opsrun/1.0",
        ["abc123def456", "CfDJ8Nabc"],
        ["upstream rejected: Cookie: [REDACTED]", "User-Agent: opsrun/1.0"],
    ),
    (
        "Set-Cookie: session=s%3AQmFzZTY0U2Vzc2lvbg.abc; Path=/; HttpOnly; Secure",
        ["QmFzZTY0U2Vzc2lvbg"],
        ["Set-Cookie: [REDACTED]"],
    ),
    (
        'Authorization: Digest username="svc", realm="api@example.com", nonce="dcd98b7102dd2f0e8b'
        '11d0f600bfb0c093", uri="/dir/index.html", response="6629fae49393a05397450978507c4ef1"\n'
        "Host: example.com",
        ["6629fae49393a05397450978507c4ef1", "dcd98b7102dd2f0e8b11d0f600bfb0c093"],
        ["Authorization: [REDACTED]", "Host: example.com"],
    ),
    (
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws"
        "4_request, SignedHeaders=host;range;x-amz-date, Signature=fe5f80f77d5fa3beca038a248ff027d"
        "0445342fe2855ddc963176630326f1024",
        [
            "AKIAIOSFODNN7EXAMPLE",
            "fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024",
        ],
        ["Authorization: [REDACTED]"],
    ),
    (
        "GET https://api.example.com/v2/items -> 401 (X-Api-Key: 5f2b9c1e-7d3a-4e8b)",
        ["5f2b9c1e-7d3a-4e8b"],
        ["GET https://api.example.com/v2/items -> 401 (X-Api-Key: [REDACTED]"],
    ),
    # --- databases ------------------------------------------------------------------------------
    (
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  password '
        'authentication failed for user "app"',
        [],
        [
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL: '
            'password authentication failed for user "app"'
        ],
    ),
    (
        '(psycopg.OperationalError) connection to server at "db" (172.18.0.3), port 5432 failed: '
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
        "\n(Background on this error at: https://sqlalche.me/e/20/e3q8)",
        [],
        [
            "Connection refused Is the server running on that host and accepting TCP/IP "
            "connections? (Background on this error at: https://sqlalche.me/e/20/e3q8)"
        ],
    ),
    (
        "Could not parse SQLAlchemy URL from string 'postgresql://app:s3cr3t@db:5432/x'",
        ["s3cr3t"],
        ["Could not parse SQLAlchemy URL from string 'postgresql://app:[REDACTED]@db:5432/x'"],
    ),
    (
        "could not connect using postgresql+psycopg://svc_opsrun:p@ss!w0rd@pg.internal:5432/opsrun",
        ["p@ss", "ss!w0rd"],
        ["postgresql+psycopg://svc_opsrun:[REDACTED]@pg.internal:5432/opsrun"],
    ),
    (
        "invalid connection option: host=db.internal port=5432 dbname=opsrun user=app "
        "password=Tr0ub4dor&3 sslmode=require",
        ["Tr0ub4dor", "&3"],
        ["host=db.internal port=5432 dbname=opsrun user=app password=[REDACTED] sslmode=require"],
    ),
    (
        "Error 111 connecting to redis://:hunter2@cache.internal:6379/0. Connection refused.",
        ["hunter2"],
        ["redis://:[REDACTED]@cache.internal:6379/0. Connection refused."],
    ),
    (
        "AMQPConnectionError: amqp://worker:w0rk3r-pw@rabbitmq:5672// connection reset",
        ["w0rk3r-pw"],
        ["amqp://worker:[REDACTED]@rabbitmq:5672// connection reset"],
    ),
    (
        "config:\n  database_url: postgresql://opsrun:pg-Pa55@db/opsrun\n  api_key: 9f86d081884c7d65"
        "\n  timeout: 30\n",
        ["pg-Pa55", "9f86d081884c7d65"],
        [
            "database_url: postgresql://opsrun:[REDACTED]@db/opsrun",
            "api_key: [REDACTED]",
            "timeout: 30",
        ],
    ),
    (
        "TypeError: connect() got an unexpected keyword argument: password='hunter2!'",
        ["hunter2!"],
        ["TypeError: connect() got an unexpected keyword argument: password='[REDACTED]'"],
    ),
    (
        "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDX"
        "J1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;EndpointSuffix=core.windows.net",
        ["Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq"],
        ["AccountName=acme;AccountKey=[REDACTED];EndpointSuffix=core.windows.net"],
    ),
    # --- Microsoft Graph / OAuth JSON bodies -------------------------------------------------------
    (
        '{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is '
        'not yet valid.","innerError":{"date":"2024-05-01T10:00:00","request-id":"4f1c5b3e-0d2a-4'
        'b6c-9e8f-1a2b3c4d5e6f"}}}',
        [],
        [
            '{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or '
            'is not yet valid.","innerError":{"date":"2024-05-01T10:00:00","request-id":"4f1c5b3e-'
            '0d2a-4b6c-9e8f-1a2b3c4d5e6f"}}}'
        ],
    ),
    (
        '{"token_type":"Bearer","scope":"https://graph.microsoft.com/.default","expires_in":3599,'
        f'"ext_expires_in":3599,"access_token":"{JWT}"}}',
        JWT_PARTS,
        [
            '{"token_type":"Bearer","scope":"https://graph.microsoft.com/.default","expires_in":3599',
            '"access_token":"[REDACTED]"}',
        ],
    ),
    (
        '{"access_token": "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJ4In0.c2ln", "refresh_token": "0.AXEAabc'
        '-def_ghi", "id_token": "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", "expires_in": 3600}',
        ["eyJ0eXAiOiJKV1QifQ", "0.AXEAabc-def_ghi", "eyJhbGciOiJub25lIn0", "eyJzdWIiOiIxIn0"],
        ['"refresh_token": "[REDACTED]"', '"expires_in": 3600}'],
    ),
    (
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request "
        "is the client secret value, not the client secret ID, for a secret added to app "
        "'00000000-0000-0000-0000-000000000000'.",
        [],
        [
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
            "request is the client secret value, not the client secret ID, for a secret added to "
            "app '00000000-0000-0000-0000-000000000000'."
        ],
    ),
    (
        '{"tenant_id": "t-1", "credentials": {"client_id": "abc", "client_secret": "xyz789"}, '
        '"policy_id": 42}',
        ["xyz789"],
        ['{"tenant_id": "t-1", "credentials": [REDACTED], "policy_id": 42}'],
    ),
    (
        "{'grant_type': 'refresh_token', 'refresh_token': '0.AXEA-abc_def', 'client_id': 'c-1'}",
        ["0.AXEA-abc_def"],
        ["{'grant_type': 'refresh_token', 'refresh_token': '[REDACTED]', 'client_id': 'c-1'}"],
    ),
    (
        'response body: "{\\"error\\":\\"invalid_grant\\",\\"refresh_token\\":\\"M.R3_BAY.abc\\"}"',
        ["M.R3_BAY.abc"],
        ['response body: "{\\"error\\":\\"invalid_grant\\",\\"refresh_token\\":\\"[REDACTED]\\"}"'],
    ),
    (
        'WWW-Authenticate: Bearer realm="graph", error="invalid_token", error_description="The '
        'access token expired"',
        [],
        [
            'WWW-Authenticate: Bearer realm="graph", error="invalid_token", error_description="The '
            'access token expired"'
        ],
    ),
    # --- tracebacks, cloud keys, tokens --------------------------------------------------------------
    (
        'Traceback (most recent call last):\n  File "/app/jobs/fetch.py", line 42, in run\n    '
        'resp.raise_for_status()\n  File "/venv/lib/requests/models.py", line 1021, in raise_for_'
        "status\n    raise HTTPError(http_error_msg, response=self)\nrequests.exceptions.HTTPError: "
        "401 Client Error: Unauthorized for url: https://maps.googleapis.com/maps/api/geocode/json?"
        "address=Berlin&key=AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
        ["AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"],
        [
            'Traceback (most recent call last): File "/app/jobs/fetch.py", line 42, in run '
            "resp.raise_for_status()",
            "address=Berlin&key=[REDACTED]",
        ],
    ),
    (
        "botocore.exceptions.ClientError: An error occurred (InvalidAccessKeyId) when calling the "
        "ListBuckets operation: The AWS Access Key Id you provided does not exist in our records. "
        "AccessKeyId=AKIAIOSFODNN7EXAMPLE",
        ["AKIAIOSFODNN7EXAMPLE"],
        [
            "The AWS Access Key Id you provided does not exist in our records. AccessKeyId=[REDACTED]"
        ],
    ),
    (
        "env: AWS_REGION=eu-west-1 AWS_ACCESS_KEY_ID=ASIAY34FZKBOKMUTVV7A AWS_SECRET_ACCESS_KEY=wJa"
        "lrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY AWS_SESSION_TOKEN=IQoJb3JpZ2luX2VjEJr",
        ["ASIAY34FZKBOKMUTVV7A", "wJalrXUtnFEMI", "IQoJb3JpZ2luX2VjEJr"],
        ["env: AWS_REGION=eu-west-1 AWS_ACCESS_KEY_ID=[REDACTED] AWS_SECRET_ACCESS_KEY=[REDACTED]"],
    ),
    (
        f"fatal: could not read from https://x-access-token:{GITHUB_TOKEN}@github.com/acme/app.git",
        [GITHUB_TOKEN, "16C7e42F292c6912"],
        ["https://x-access-token:[REDACTED]@github.com/acme/app.git"],
    ),
    (
        "using github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV for "
        "acme/app; remote: HTTP Basic: Access denied for glpat-xxxxxxxxxxxxxxxxxxxx1234",
        ["github_pat_11ABCDEFG", "abcdefghijklmnopqrstuvwxyz", "glpat-xxxxxxxxxxxx"],
        ["for acme/app; remote: HTTP Basic: Access denied for [REDACTED]"],
    ),
    (
        "slack_sdk.errors.SlackApiError: The request to the Slack API failed. (url: https://slack."
        "com/api/chat.postMessage) token xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx "
        "revoked",
        ["xoxb-", "AbCdEfGhIjKlMnOpQrStUvWx"],
        ["(url: https://slack.com/api/chat.postMessage) token [REDACTED] revoked"],
    ),
    (
        "stripe.error.AuthenticationError: Invalid API Key provided: sk_live_4eC39HqLyjWDarjtT1zdp7"
        "dc (also tried rk_test_51H8abcdEFGHijklMNOP and pk_live_51H8abcdEFGHijkl)",
        ["4eC39HqLyjWDarjtT1zdp7dc", "51H8abcdEFGHijklMNOP", "51H8abcdEFGHijkl"],
        ["stripe.error.AuthenticationError: Invalid API Key provided: [REDACTED] (also tried"],
    ),
    (
        "openai.AuthenticationError: Error code: 401 - {'error': {'message': 'Incorrect API key "
        "provided: sk-proj-abcdefghijklmnopqrstuvwxyz123456.', 'type': 'invalid_request_error'}}",
        ["abcdefghijklmnopqrstuvwxyz123456"],
        ["'type': 'invalid_request_error'}}", "Incorrect API key provided: [REDACTED]."],
    ),
    (
        "TypeError: connect() got an unexpected keyword argument 'api_version' (did you mean 'v'?)",
        [],
        [
            "TypeError: connect() got an unexpected keyword argument 'api_version' (did you mean 'v'?)"
        ],
    ),
    # --- private keys ---------------------------------------------------------------------------
    (
        f"could not load key: -----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY_1}\n{PEM_BODY_2}\n"
        "-----END RSA PRIVATE KEY-----\nusing fallback",
        [PEM_BODY_1, PEM_BODY_2, "PRIVATE KEY"],
        ["could not load key: [REDACTED] using fallback"],
    ),
    (
        "key file: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
        "AAAAAAAAABAAAAMwAAAAtzc2gtZW",
        ["b3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "OPENSSH"],
        ["key file: [REDACTED]"],
    ),
    (
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\r\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\r\n"
        "-----END ENCRYPTED PRIVATE KEY-----",
        ["MIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI"],
        [],
    ),
    # --- benign: unchanged --------------------------------------------------------------------------
    (
        "server cert: -----BEGIN CERTIFICATE----- MIIBszCCAVmgAwIBAgIU -----END CERTIFICATE-----",
        [],
        ["server cert: -----BEGIN CERTIFICATE----- MIIBszCCAVmgAwIBAgIU -----END CERTIFICATE-----"],
    ),
    (
        "assignments.fetch for tenant t-42: processed 120 of 130 items, 10 failed (policy "
        "'Baseline', tenant_id=abc)",
        [],
        [
            "assignments.fetch for tenant t-42: processed 120 of 130 items, 10 failed (policy "
            "'Baseline', tenant_id=abc)"
        ],
    ),
    (
        "HTTPSConnectionPool(host='graph.microsoft.com', port=443): Max retries exceeded with url: "
        "/v1.0/deviceManagement (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection "
        "object at 0x7f>: Failed to establish a new connection: [Errno 111] Connection refused'))",
        [],
        [
            "HTTPSConnectionPool(host='graph.microsoft.com', port=443): Max retries exceeded with "
            "url: /v1.0/deviceManagement (Caused by NewConnectionError('<urllib3.connection.HTTPS"
            "Connection object at 0x7f>: Failed to establish a new connection: [Errno 111] "
            "Connection refused'))"
        ],
    ),
    (
        "Token bucket exhausted: tokens_used=5000 session_count=12 token_type=Bearer",
        [],
        ["Token bucket exhausted: tokens_used=5000 session_count=12 token_type=Bearer"],
    ),
    (
        "GET https://api.example.com:8443/v1/items?page=2&per_page=100 returned 503",
        [],
        ["GET https://api.example.com:8443/v1/items?page=2&per_page=100 returned 503"],
    ),
    (
        "Retry 3/5 after 429 Too Many Requests (Retry-After: 12s) for workspace w-7",
        [],
        ["Retry 3/5 after 429 Too Many Requests (Retry-After: 12s) for workspace w-7"],
    ),
    (
        "ssh://git@github.com/acme/app.git: Permission denied (publickey)",
        [],
        ["ssh://git@github.com/acme/app.git: Permission denied (publickey)"],
    ),
    (
        "Basic validation failed for policy 'Windows 10 Baseline' (3 settings), backup_id=9001",
        [],
        ["Basic validation failed for policy 'Windows 10 Baseline' (3 settings), backup_id=9001"],
    ),
    (
        "run 7d0c2a5e-3f4b-4c8d-9e1f-0a2b3c4d5e6f: lease lost after 3 attempts (policy_id=42, "
        "user: alice@example.com)",
        [],
        [
            "run 7d0c2a5e-3f4b-4c8d-9e1f-0a2b3c4d5e6f: lease lost after 3 attempts (policy_id=42, "
            "user: alice@example.com)"
        ],
    ),
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40
    assert sum(1 for _, secrets, _ in CORPUS if secrets) >= 30


@pytest.mark.parametrize(
    ("message", "secrets", "kept"), CORPUS, ids=[f"corpus-{i}" for i in range(len(CORPUS))]
)
def test_corpus(message: str, secrets: list[str], kept: list[str]) -> None:
    result = sanitize_message(message, max_length=2000)
    for secret in secrets:
        assert secret not in result
    for fragment in kept:
        assert fragment in result
    assert (REDACTED in result) == bool(secrets)
    assert sanitize_message(result, max_length=2000) == result


def test_benign_one_line_messages_are_unchanged() -> None:
    for message, secrets, kept in CORPUS:
        if not secrets and kept == [message]:
            assert sanitize_message(message, max_length=2000) == message


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("password=hunter2", "password=[REDACTED]"),
        ("Password: hunter2 for app", "Password: [REDACTED] for app"),
        ('{"client_secret": "x", "n": 1}', '{"client_secret": "[REDACTED]", "n": 1}'),
        ("{'apiKey': 'x'}", "{'apiKey': '[REDACTED]'}"),
        ("Authorization: Bearer abc.def", "Authorization: [REDACTED]"),
        ("Bearer abc.def next", "Bearer [REDACTED] next"),
        ("Basic dXNlcjpwYXNz", "Basic [REDACTED]"),
        ("https://user:pw@example.com/x", "https://user:[REDACTED]@example.com/x"),
        ("token: Bearer abc", "token: [REDACTED]"),
        ("token=a,b", "token=[REDACTED]"),
        ("token=a, b=1", "token=[REDACTED], b=1"),
        ("--password=x -v", "--password=[REDACTED] -v"),
        ("secret => 'x'", "secret => '[REDACTED]'"),
        ("api_key=", "api_key="),
        (REDACTED, REDACTED),
        ("password=" + REDACTED, "password=" + REDACTED),
    ],
)
def test_exact_redactions(message: str, expected: str) -> None:
    assert sanitize_message(message) == expected


# --- folding -----------------------------------------------------------------------------------


def test_controls_and_separators_fold_to_single_spaces() -> None:
    message = "  a\n\tb\r\n c\x00d\x07e\x1b[0mf\x7fg\x85h\u2028i\u2029j\u00a0k\u3000l  "
    assert sanitize_message(message) == "a b c d e [0mf g h i j k l"


def test_invisible_characters_are_removed() -> None:
    assert sanitize_message("pass\u200bword=hunter2 \u202eabc\ufeff") == "password=[REDACTED] abc"


def test_lone_surrogates_are_replaced() -> None:
    result = sanitize_message("a\ud800b \ud83d\ude00")
    assert result == "a\ufffdb 😀"
    result.encode("utf-8")


# --- length --------------------------------------------------------------------------------------


def test_cut_is_marked_and_within_the_limit() -> None:
    assert sanitize_message("abcdefghij", max_length=5) == "abcd…"
    assert sanitize_message("abc defghij", max_length=5) == "abc…"
    assert sanitize_message("abcde", max_length=5) == "abcde"
    assert sanitize_message("x" * 1000) == "x" * (DEFAULT_MAX_LENGTH - 1) + "…"


def test_cut_never_leaves_a_partial_redaction() -> None:
    assert sanitize_message("password=hunter2 and more", max_length=15) == "password…"
    assert sanitize_message("password=hunter2 and more", max_length=20) == "password=[REDACTED]…"


@pytest.mark.parametrize("max_length", [1, 0, -5])
def test_tiny_limits_leave_only_the_mark(max_length: int) -> None:
    assert sanitize_message("hello world", max_length=max_length) == "…"
    assert sanitize_message("", max_length=max_length) == ""


@pytest.mark.parametrize("max_length", [None, "20", 2.5, object()])
def test_a_bad_limit_falls_back_to_the_default(max_length: Any) -> None:
    assert sanitize_message("x" * 600, max_length=max_length) == "x" * 499 + "…"


def test_huge_input_is_bounded() -> None:
    result = sanitize_message("word password=hunter2 " * 200_000)
    assert len(result) <= DEFAULT_MAX_LENGTH
    assert result.endswith("…")
    assert "hunter2" not in result


# --- any object --------------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("boom")


class Leaky:
    def __str__(self) -> str:
        return "connect failed: password=hunter2"


class Text(str):
    def __str__(self) -> str:
        return "not the text"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "None"),
        (42, "42"),
        (b"password=hunter2\xff", "password=[REDACTED]"),
        (bytearray(b"line\nbreak"), "line break"),
        (memoryview(b"token=abc"), "token=[REDACTED]"),
        (ValueError("bad client_secret=abc"), "bad client_secret=[REDACTED]"),
        (Unprintable(), "<unprintable Unprintable>"),
        (Leaky(), "connect failed: password=[REDACTED]"),
        (Text("plain"), "plain"),
        (["token=abc", 1], "['token=[REDACTED]', 1]"),
    ],
)
def test_any_object(value: object, expected: str) -> None:
    assert sanitize_message(value) == expected


# --- properties ------------------------------------------------------------------------------

#: Pieces of the patterns, so random messages hit their edges (partial keys, quotes, cuts).
FRAGMENTS = [
    "password", "token", "Authorization", "Cookie", "client_secret", "accessToken", "policy_id",
    "=", ":", " : ", "=>", '"', "'", '\\"', "\\", ",", ";", "&", "?", "/", "#", "@", "://",
    "https", "user", ":pw", "Bearer ", "Basic ", "dXNlcjpwYXNz", "realm=", "==", "eyJhbGciOi",
    "eyJ", ".", "AKIA", "ABCDEFGHIJKLMNOP", "ghp_", "a" * 20, "sk_live_", "AIza", "xoxb-",
    "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", REDACTED, "[", "]", "{",
    "}", "…", " ", "\n", "\t", "\u200b", "\x00", "\u2028", "0123456789", "-", "_",
]  # fmt: skip

_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()))
MESSAGES = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40).map("".join),
    _ANY_TEXT,
)
ANY_OBJECT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _ANY_TEXT | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
        | st.tuples(children, children)
    ),
    max_leaves=12,
)
LIMITS = st.one_of(st.just(DEFAULT_MAX_LENGTH), st.integers(min_value=-3, max_value=120))


def _assert_well_formed(result: str, max_length: int) -> None:
    assert isinstance(result, str)
    assert len(result) <= max(1, max_length)
    assert not any(unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") for c in result)
    assert result == result.strip()
    assert "  " not in result
    result.encode("utf-8")


@settings(max_examples=300)
@given(MESSAGES, LIMITS)
def test_text_is_idempotent_and_well_formed(message: str, max_length: int) -> None:
    result = sanitize_message(message, max_length)
    _assert_well_formed(result, max_length)
    assert sanitize_message(result, max_length) == result


@settings(max_examples=300)
@given(ANY_OBJECT, LIMITS)
def test_any_object_never_raises(value: object, max_length: int) -> None:
    result = sanitize_message(value, max_length)
    _assert_well_formed(result, max_length)
    assert sanitize_message(result, max_length) == result


@given(_ANY_TEXT)
def test_default_limit(message: str) -> None:
    result = sanitize_message(message)
    _assert_well_formed(result, DEFAULT_MAX_LENGTH)
    assert sanitize_message(result) == result


_SECRET_VALUES = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=40)
_TEMPLATES = [
    "password={}",
    "client_secret: {}",
    '{{"access_token": "{}"}}',
    "{{'refresh_token': '{}'}}",
    "Authorization: Bearer {}",
    "Authorization: {}",
    "Bearer {}",
    "postgresql://app:{}@db:5432/x",
    "https://example.com/cb?code=1&id_token={}&state=2",
    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
    "X-Api-Key: {}",
    "Cookie: sid={}; theme=dark",
]
_BENIGN_WORDS = st.lists(
    st.sampled_from(["failed", "tenant_id=t1", "retry", "(429)", "policy", "user:", "a,", "\n"]),
    max_size=6,
).map(" ".join)


@settings(max_examples=300)
@given(_BENIGN_WORDS, st.sampled_from(_TEMPLATES), _SECRET_VALUES, _BENIGN_WORDS)
def test_secret_values_never_survive(before: str, template: str, secret: str, after: str) -> None:
    result = sanitize_message(f"{before} {template.format(secret)} {after}", max_length=2000)
    assert secret not in result
    assert REDACTED in result
