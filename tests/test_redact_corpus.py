"""The redactor against a corpus: every kind of secret is caught, ids and payloads survive.

Secrets are generated (seeded) rather than written out, so the repository holds none that a
scanner would flag. Each case runs with the RE2 gate and without it: both must agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop._redact import DEFAULT_RULES, Redactor, clip

_rng = random.Random(20261201)
ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def luhn_complete(prefix: str, length: int) -> str:
    """A card number: ``prefix``, random digits, and the Luhn check digit."""
    body = prefix + rand(length - len(prefix) - 1, string.digits)
    for check in string.digits:
        digits = [int(c) for c in body + check]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
                    for i, d in enumerate(reversed(digits)))
        if total % 10 == 0:
            return body + check
    raise AssertionError("unreachable")


def pem(kind: str) -> str:
    lines = [base64.b64encode(_rng.randbytes(48)).decode() for _ in range(6)]
    head = f"{kind} PRIVATE KEY".strip()
    return f"-----BEGIN {head}-----\n" + "\n".join(lines) + f"\n-----END {head}-----"


def jwt() -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    sig = base64.urlsafe_b64encode(_rng.randbytes(32)).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': rand(8), 'iat': 1})}.{sig}"


# (kind, secret, text around it with {} for the secret)
POSITIVES: list[tuple[str, str, str]] = [
    ("openai_key", "sk-proj-" + rand(74, ALNUM + "_-") + "T3BlbkFJ" + rand(74), "key={}"),
    ("openai_key", "sk-svcacct-" + rand(58, ALNUM + "_-"), "OPENAI_API_KEY {}"),
    ("openai_key", "sk-admin-" + rand(40), "admin key {} in config"),
    ("openai_key", "sk-" + rand(20) + "T3BlbkFJ" + rand(20), "legacy {}"),
    ("openai_key", "sk-" + rand(48), '{{"api_key_value": "{}"}}'),
    ("anthropic_key", "sk-ant-api03-" + rand(93, ALNUM + "_-") + "AA", "x-api-key: {}"),
    ("anthropic_key", "sk-ant-admin01-" + rand(93, ALNUM + "_-") + "AA", "admin {}"),
    ("google_key", "AIza" + rand(35, ALNUM + "_-"), "https://maps.example/api?x=1 with {}"),
    ("google_key", "AIzaSy" + rand(33), "GOOGLE_KEY {}"),
    ("github_token", "ghp_" + rand(36), "git clone with {}"),
    ("github_token", "gho_" + rand(36), "oauth {}"),
    ("github_token", "ghs_" + rand(36), "app {}"),
    ("github_token", "ghu_" + rand(36), "user-to-server {}"),
    ("github_token", "ghr_" + rand(36), "refresh {}"),
    ("github_token", "github_pat_" + rand(22) + "_" + rand(59), "fine-grained {}"),
    ("gitlab_token", "glpat-" + rand(20, ALNUM + "_-"), "PRIVATE-TOKEN {}"),
    ("gitlab_token", "glpat-" + rand(27) + "." + rand(2).lower() + rand(7).lower(), "pat {}"),
    ("gitlab_token", "gldt-" + rand(20), "deploy {}"),
    ("gitlab_token", "glptt-" + rand(40, "0123456789abcdef"), "trigger {}"),
    ("gitlab_token", "glrt-" + rand(20), "runner {}"),
    ("gitlab_token", "GR1348941" + rand(20), "registration {}"),
    ("gitlab_token", "glcbt-" + rand(5) + "_" + rand(20), "ci build {}"),
    ("slack_token", "xoxb-" + rand(12, string.digits) + "-" + rand(13, string.digits) + "-"
     + rand(24), "bot {}"),
    ("slack_token", "xoxp-" + "-".join(rand(12, string.digits) for _ in range(3)) + "-"
     + rand(32, "0123456789abcdef"), "user {}"),
    ("slack_token", "xapp-1-A" + rand(10, string.digits) + "-" + rand(13, string.digits) + "-"
     + rand(64, "0123456789abcdef"), "app {}"),
    ("slack_token", "xoxe.xoxp-1-" + rand(163), "config {}"),
    ("slack_webhook", "hooks.slack.com/services/T" + rand(8) + "/B" + rand(8) + "/" + rand(24),
     "POST https://{}"),
    ("stripe_key", "sk_live_" + rand(24), "stripe {}"),
    ("stripe_key", "sk_test_" + rand(99), "stripe {}"),
    ("stripe_key", "rk_live_" + rand(32), "restricted {}"),
    ("stripe_key", "whsec_" + rand(32), "signing {}"),
    ("huggingface_token", "hf_" + rand(34, string.ascii_letters), "HF_TOKEN {}"),
    ("huggingface_token", "api_org_" + rand(34, string.ascii_letters), "org {}"),
    ("aws_access_key", "AKIA" + rand(16, string.ascii_uppercase + "234567"), "id {} ok"),
    ("aws_access_key", "ASIA" + rand(16, string.ascii_uppercase + "234567"), "temp {}"),
    ("aws_access_key", "AKIA" + rand(16, string.ascii_uppercase + "234567"), "first line\n{}"),
    ("aws_access_key", "AKIA" + rand(16, string.ascii_uppercase + "234567"),
     r"repr of a dict {{'k': 'a\n{}'}}"),
    ("aws_secret_key", rand(40, ALNUM + "/+"), "aws_secret_access_key = {}"),
    ("aws_secret_key", rand(40, ALNUM + "/+"), '{{"AWS_SECRET_ACCESS_KEY": "{}"}}'),
    ("aws_secret_key", rand(40, ALNUM + "/+"), "export AWS_SECRET_KEY={}"),
    ("jwt", jwt(), "Authorization header was {} ."),
    ("jwt", jwt(), "id_token_value {}"),
    ("jwt", jwt(), '{{"session": "{}"}}'),
    ("private_key", pem("RSA"), "key file:\n{}\nend"),
    ("private_key", pem("EC"), "{}"),
    ("private_key", pem("OPENSSH"), "ssh {}"),
    ("private_key", pem(""), "pkcs8 {}"),
    ("private_key", pem("ENCRYPTED"), "{}"),
    ("url_password", rand(12), "postgres://app:{}@db.internal:5432/orders"),
    ("url_password", rand(16), "redis://:{}@cache:6379/0"),
    ("url_password", rand(10) + "%40" + rand(4), "https://deploy:{}@git.example.com/repo.git"),
    ("url_password", rand(14), "mongodb+srv://admin:{}@cluster0.example.net/?retryWrites=true"),
    ("url_password", rand(14), "amqp://guest:{}@rabbit/vhost"),
    ("url_password", rand(14), '{{"dsn": "mysql://root:{}@127.0.0.1/db"}}'),
    ("secret", rand(14), "password={}"),
    ("secret", rand(14), '{{"password": "{}"}}'),
    ("secret", rand(8) + " " + rand(8), "{{'passphrase': '{}'}}"),
    ("secret", rand(20), "client_secret: {}"),
    ("secret", rand(20), "https://api.example.com/v1?api_key={}&page=2"),
    ("secret", rand(20), "https://api.example.com/v1?access_token={}"),
    ("secret", rand(20), "DB_PASSWORD={}"),
    ("secret", rand(30), "X-Amz-Signature={}"),
    ("secret", rand(30), "https://acct.blob.example.net/c/b?sv=2022&sig={}"),
    ("secret", rand(12), r'{{\"password\": \"{}\"}}'),
    ("authorization", base64.b64encode(b"user:" + rand(12).encode()).decode(),
     "Authorization: Basic {}"),
    ("authorization", rand(40), "authorization: Token {}"),
    ("bearer", rand(40, ALNUM + "-._~+/"), "curl -H 'X-Auth: Bearer {}'"),
    ("email", "jane.doe+ops@example.co.uk", "contact {} please"),
    ("email", "ops@sub.example.com", "<{}>"),
    ("email", "a_b-c@x-y.io", "mailto:{}"),
    ("card_number", luhn_complete("4", 16), "visa {}"),
    ("card_number", luhn_complete("4", 13), "old visa {}"),
    ("card_number", luhn_complete("51", 16), "mastercard {}"),
    ("card_number", luhn_complete("2221", 16), "mastercard 2-series {}"),
    ("card_number", luhn_complete("37", 15), "amex {}"),
    ("card_number", luhn_complete("6011", 16), "discover {}"),
    ("card_number", luhn_complete("35", 16), "jcb {}"),
    ("card_number", luhn_complete("36", 14), "diners {}"),
    ("card_number", luhn_complete("62", 19), "unionpay {}"),
    ("card_number", "4111 1111 1111 1111", "spaced {}"),
    ("card_number", "5105-1051-0510-5100", "dashed {}"),
    ("card_number", "4111111111111111", "csv 12,{},34"),
    ("card_number", "4111111111111111", "json [1,{}]"),
    ("card_number", luhn_complete("4", 16), "qty 12 {} 3 items"),  # next to other numbers
    ("card_number", "4111 1111 1111 1111", "{} 2"),
    ("card_number", luhn_complete("5", 16), "2026-{}"),
]


def redactors() -> list[Redactor]:
    return [Redactor(gate=True), Redactor(gate=False)]


@pytest.mark.parametrize("gate", [True, False], ids=["re2-gate", "no-gate"])
@pytest.mark.parametrize(("kind", "secret", "context"), POSITIVES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVES)])
def test_every_kind_of_secret_is_redacted(kind: str, secret: str, context: str,
                                          gate: bool) -> None:
    text = context.format(secret)
    out = Redactor(gate=gate)(text)
    assert secret not in out
    assert f"[REDACTED:{kind}]" in out


def test_the_corpus_covers_every_built_in_rule() -> None:
    assert {k for k, _, _ in POSITIVES} == {r.kind for r in DEFAULT_RULES}


def test_a_url_keeps_its_scheme_user_and_host() -> None:
    out = Redactor()("postgres://app:hunter2hunter2@db.internal:5432/orders")
    assert out == "postgres://app:[REDACTED:url_password]@db.internal:5432/orders"


def test_an_assignment_keeps_its_name() -> None:
    assert Redactor()('{"password": "correct horse"}') == '{"password": "[REDACTED:secret]"}'


def test_a_private_key_cut_short_is_redacted_to_its_end() -> None:
    block = pem("RSA")
    cut = block[: len(block) // 2]
    out = Redactor()(f"dump: {cut}")
    assert out == "dump: [REDACTED:private_key]"


def _negatives() -> list[str]:
    rng = random.Random(7)
    out: list[str] = []
    out += [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(50)]
    out += [hashlib.sha1(rng.randbytes(16)).hexdigest() for _ in range(50)]
    out += [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(50)]
    out += [hashlib.md5(rng.randbytes(16)).hexdigest() for _ in range(20)]
    out += [f"{rng.getrandbits(128):032x}" for _ in range(50)]  # trace ids
    out += [f"{rng.getrandbits(64):016x}" for _ in range(50)]  # span ids
    out += [base64.b64encode(rng.randbytes(n)).decode() for n in (12, 33, 48, 96, 300, 768)]
    out += [base64.urlsafe_b64encode(rng.randbytes(n)).decode() for n in (24, 64, 200)]
    out += [
        "Create a t3.micro in eu-west-1 with 20 GiB of gp3 storage.",
        "The password must be at least 12 characters long.",
        "token limit exceeded: 4096 > 4000",
        "max_tokens: 4096, input_tokens=420, output_tokens=64",
        '{"max_tokens": 4096, "temperature": 0.2, "model": "gpt-4o"}',
        "https://example.com/path/to/page?q=closed+loop&page=2#section",
        "http://localhost:8080/metrics",
        "postgres://db.internal:5432/app",
        "redis://127.0.0.1:6379/0",
        "s3://bucket/key/with/slashes.json",
        "arn:aws:iam::123456789012:role/Admin",
        "ami-0abcdef1234567890 i-0123456789abcdef0 sg-0123456789abcdef0",
        "aws_instance.web[0] module.vpc.aws_subnet.private[\"eu-west-1a\"]",
        "task-risk-assessment-for-production-team-2026",
        "task_test_" + "abcdefghij" * 3,
        "the risk-adjusted ask-price-volatility-index rose",
        "version 1.2.3, python 3.11.7, build 2026-12-01T09:05:45Z",
        "4111111111111112",  # fails Luhn
        "1234567890123456",  # passes no network prefix
        "1733045145123456789",  # a timestamp in ns
        "1733045145123",  # in ms
        "3.14159265358979323846",
        "192.168.10.254 and 2001:db8::1",
        "They keyed the key: value pairs into the map.",
        "sk-1234 is too short to be a key",
        "eyes.eyebrows and keys.eyelids",
        "user@localhost",  # no top-level domain
        "Bearer of bad news",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----",
        "[REDACTED:openai_key] already redacted",
        "Ünïcödé prose, 中文, emoji 🎉 and tabs\tand\nnewlines",
    ]
    return out


NEGATIVES = _negatives()


@pytest.mark.parametrize("gate", [True, False], ids=["re2-gate", "no-gate"])
def test_ids_hashes_payloads_and_prose_survive(gate: bool) -> None:
    redactor = Redactor(gate=gate)
    changed = {text: redactor(text) for text in NEGATIVES if redactor(text) != text}
    assert changed == {}
    assert len(NEGATIVES) > 300


@pytest.mark.parametrize("gate", [True, False], ids=["re2-gate", "no-gate"])
def test_a_json_document_of_negatives_survives(gate: bool) -> None:
    doc = json.dumps({"ids": NEGATIVES[:200], "payload": NEGATIVES[300:306]})
    assert Redactor(gate=gate)(doc) == doc


@pytest.mark.parametrize("gate", [True, False], ids=["re2-gate", "no-gate"])
def test_text_with_lone_surrogates_is_redacted(gate: bool) -> None:
    # e.g. a file name decoded with surrogateescape: not valid UTF-8, still redacted
    key = "sk-proj-" + "a1B2" * 8
    assert Redactor(gate=gate)(f"\udcff {key}") == "\udcff [REDACTED:openai_key]"


def test_user_patterns_add_to_the_built_in_rules() -> None:
    redactor = Redactor([r"ACCT-\d{6}"])
    out = redactor("account ACCT-123456 of bob@example.com")
    assert out == "account [REDACTED:custom] of [REDACTED:email]"


def test_user_patterns_alone() -> None:
    assert Redactor([r"ACCT-\d{6}"], defaults=False)("ACCT-123456 bob@example.com") == (
        "[REDACTED:custom] bob@example.com")


def test_a_malformed_user_pattern_fails_when_the_redactor_is_made() -> None:
    with pytest.raises(Exception, match="missing"):
        Redactor([r"(unclosed"])


def test_values_under_secret_names_are_replaced_whole() -> None:
    data = {"password": "hunter2", "db": {"api_key": "abc", "port": 5432},
            "max_tokens": 4096, "items": [{"token": "t0"}, "bob@example.com"],
            "pair": ("x", "sk-" + "a" * 30), "enabled": True, "pin": 1234}
    assert Redactor().value(data) == {
        "password": "[REDACTED:secret]", "db": {"api_key": "[REDACTED:secret]", "port": 5432},
        "max_tokens": 4096, "items": [{"token": "[REDACTED:secret]"}, "[REDACTED:email]"],
        "pair": ("x", "[REDACTED:openai_key]"), "enabled": True, "pin": 1234}


# -- properties ---------------------------------------------------------------------------

SECRETS = st.sampled_from([(kind, secret) for kind, secret, _ in POSITIVES
                           if kind not in ("url_password", "secret", "authorization",
                                           "bearer", "aws_secret_key")])
SEPARATORS = st.sampled_from([" ", "\n", "\t", ", ", "; ", " (", ") ", '"', "'", " = ", ": ",
                              "\\n", "<", ">", "[", "] "])
TEXT = st.text(st.characters(codec="utf-8"), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=TEXT, sep1=SEPARATORS, item=SECRETS, sep2=SEPARATORS, after=TEXT,
       gate=st.booleans())
def test_a_secret_anywhere_in_text_never_survives(
    before: str, sep1: str, item: tuple[str, str], sep2: str, after: str, *, gate: bool,
) -> None:
    _, secret = item
    out = Redactor(gate=gate)(before + sep1 + secret + sep2 + after)
    assert secret not in out


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(TEXT, SEPARATORS, st.sampled_from(
    [context.format(secret) for _, secret, context in POSITIVES])), max_size=6))
def test_redaction_is_idempotent(parts: list[str]) -> None:
    redactor = Redactor()
    once = redactor("".join(parts))
    assert redactor(once) == once


@settings(max_examples=200, deadline=None)
@given(before=st.integers(0, 120), item=SECRETS, limit=st.integers(1, 160))
def test_a_cut_never_leaves_a_piece_of_a_secret(before: int, item: tuple[str, str],
                                                limit: int) -> None:
    _, secret = item
    out = clip("x" * before + " " + secret + " and more text after it", limit)
    pieces = {secret[i:i + 12] for i in range(max(1, len(secret) - 11))}
    assert not any(p in out for p in pieces if len(p) == 12)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(TEXT, SEPARATORS, st.sampled_from(
    [context.format(secret) for _, secret, context in POSITIVES] + NEGATIVES[::10])),
    max_size=6))
def test_the_gate_never_changes_the_result(parts: list[str]) -> None:
    text = "".join(parts)
    assert Redactor(gate=True)(text) == Redactor(gate=False)(text)


# -- many texts at once (the store writer's proposals) --------------------------------------

def test_no_trigger_uses_an_assertion_that_joining_texts_would_change() -> None:
    # Redactor.many scans texts joined by newlines in multi-line mode: ^ and $ then match at
    # each text's ends, \b sees the newline as a text's edge; \A, \z and \B would not
    for rule in DEFAULT_RULES:
        for assertion in ("\\A", "\\z", "\\B"):
            assert assertion not in rule.trigger, rule.kind


@pytest.mark.parametrize("gate", [True, False], ids=["re2-gate", "no-gate"])
def test_many_texts_are_redacted_as_each_alone(gate: bool) -> None:
    texts = [context.format(secret) for _, secret, context in POSITIVES] + NEGATIVES
    texts += [f'{{"action":"scale","replicas":{i},"service":"web-{i}"}}' for i in range(50)]
    texts += [secret for _, secret, _ in POSITIVES]  # a secret that is the whole text
    texts += ["password", "token", "x", "", "a\ud800b password=hunter2"]
    _rng.shuffle(texts)
    one_by_one = [Redactor(gate=gate)(t) for t in texts]
    assert Redactor(gate=gate).many(texts) == one_by_one
    assert Redactor([r"ACCT-\d{6}"], gate=gate).many(["ACCT-123456", "clean", "x"]) == [
        "[REDACTED:custom]", "clean", "x"]


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.lists(st.one_of(TEXT, SEPARATORS, st.sampled_from(
    [context.format(secret) for _, secret, context in POSITIVES] + NEGATIVES[::10])),
    max_size=4).map("".join), min_size=2, max_size=8))
def test_many_never_changes_the_result(texts: list[str]) -> None:
    assert Redactor().many(texts) == [Redactor()(t) for t in texts]
