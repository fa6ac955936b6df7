"""Redaction: secrets and personal data never leave the process.

Every text closedloop stores, exports or logs passes a :class:`Redactor` first: step events
(``error_message``, ``detail``), spans (status message, attributes, events, captured content),
scores' comments, control reasons and evidence, alerts, dead-letter files and log lines. A match
is replaced by ``[REDACTED:<kind>]``; for a credential with context (a URL's password, a
``password=...`` assignment, an ``Authorization`` header) only the secret part is replaced, so
the text still says what was there.

Redaction runs on the raw text, before it is serialised (JSON escaping would turn a newline
before a key into ``\\n`` and hide the key's start) and before it is truncated (a cut through a
secret leaves a fragment no pattern recognises).

The API other modules use, stable:

- :func:`redact_text` ``(str) -> str`` and :func:`redact_value` ``(obj) -> obj`` (recursive
  over dicts, lists and tuples; a value under a key named like a secret, such as ``password``
  or ``api_key``, is replaced whole), both with the process default redactor;
- :func:`clip` ``(str, max_chars) -> str``: redact, then truncate;
- :func:`shown_url` ``(url) -> str``: the URL with its password masked, for output and logs;
- :class:`Redactor` (the built-in rules plus the user's own patterns) and
  :func:`set_default_redactor` / :func:`default_redactor` / :func:`reset_default_redactor`.

The built-in rules are ported from gitleaks' rule set (https://github.com/gitleaks/gitleaks,
``cmd/generate/config/rules/*.go``, MIT licence, Copyright (c) 2019 Zachary Rice), adapted to
Python's ``re`` and to redaction rather than scanning (broader where a miss costs more than an
over-redaction, e.g. OpenAI keys without gitleaks' ``T3BlbkFJ`` marker). Card numbers are
Luhn-checked and must start with a card network's prefix.

Speed: with ``google-re2`` installed (the ``re2`` extra), one linear-time RE2 scan over all
rules' triggers decides whether any rule must run, and an RE2 set which ones; clean text costs
that scan (~2.5 µs per KiB). Without it, each rule whose literal keywords occur in the text
runs (the same results, 30-70 µs per KiB). Strings of up to 256 characters (attribute values,
task types) are cached per redactor. Figures: ``bench/redact.py`` and BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import logging
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from operator import itemgetter
from re import Pattern
from typing import TYPE_CHECKING, Any

from closedloop import _runtime
from closedloop._events import EVENT_FIELDS, PROPOSAL_MAX_CHARS, clip_proposal

if TYPE_CHECKING:
    from closedloop._events import StepEvent

REDACTED = "[REDACTED]"


def _after(prefix: str, charset: str = "A-Za-z0-9_-") -> str:
    """``prefix`` (a literal), not preceded by a character of ``charset`` unless that is a
    JSON/repr escape ("\\n", "\\t", "\\r") ending the previous line. The literal comes first
    so that ``re`` can search for it quickly; the boundary is checked behind it."""
    n = len(prefix)
    dots = "." * n
    return (f"{re.escape(prefix)}(?:(?<![{charset}]{dots})|(?<=\\\\[nrt]{dots}))")


class Rule:
    """One kind of secret.

    ``pattern`` (Python ``re``) finds it; when the pattern has groups, only the groups that
    took part in the match are replaced (the context around them stays readable), otherwise
    the whole match is. ``check`` may reject a match; ``replace`` replaces the standard
    replacement (card numbers: the plausible cards within a run of digit groups). The rule is tried
    only when one of ``keywords`` occurs in the text (``ikeywords``: in the lower-cased text)
    and ``worth_trying`` (if given) says yes; a rule without keywords is always tried.
    ``trigger`` is an RE2 pattern that matches wherever ``pattern`` could (a superset, without
    look-arounds): with ``google-re2`` installed, one linear-time scan for all triggers
    decides whether any rule runs, and an RE2 set which ones.
    """

    __slots__ = ("check", "ikeywords", "keywords", "kind", "pattern", "replace", "trigger",
                 "worth_trying")

    def __init__(self, kind: str, pattern: str, trigger: str, *,
                 keywords: tuple[str, ...] = (), ikeywords: tuple[str, ...] = (),
                 check: Callable[[str], bool] | None = None,
                 worth_trying: Callable[[str], bool] | None = None,
                 replace: Callable[[re.Match[str]], str] | None = None) -> None:
        # a plain class, not a dataclass: built at import, where a dataclass costs ~0.5 ms
        self.kind, self.pattern, self.trigger = kind, pattern, trigger
        self.keywords, self.ikeywords = keywords, ikeywords
        self.check, self.worth_trying, self.replace = check, worth_trying, replace

    def __repr__(self) -> str:
        return f"Rule({self.kind!r})"


def _enough_digits(text: str) -> bool:
    """At least 13 digits: the least a card number has (10 C-speed counts, no regex)."""
    n = 0
    for d in "0123456789":
        n += text.count(d)
        if n >= 13:
            return True
    return False


def _luhn_card(text: str) -> bool:
    """A plausible payment card number: 13-19 digits, a network's prefix, a valid Luhn sum."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    n = len(digits)
    if not 13 <= n <= 19:
        return False
    head2 = digits[0] * 10 + digits[1]
    head4 = head2 * 100 + digits[2] * 10 + digits[3]
    # Visa 4; Mastercard 51-55, 2221-2720; Amex 34, 37; Diners 30, 36, 38, 39; JCB 35;
    # Discover/UnionPay 6011, 62, 64, 65; Maestro 50, 56-58, 67
    if not (digits[0] == 4 or 50 <= head2 <= 58 or 2221 <= head4 <= 2720
            or head2 in (30, 34, 35, 36, 37, 38, 39, 62, 64, 65, 67) or head4 == 6011):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += (d * 2 - 9 if d > 4 else d * 2) if i % 2 else d
    return total % 10 == 0


_DIGIT_RUN = re.compile(r"[0-9]+")


def _redact_cards(m: re.Match[str]) -> str:
    """The card numbers in a run of digit groups (``4111 1111 1111 1111``, or a card next to
    other numbers: ``12 4111111111111111 3``): each window of whole groups with 13-19 digits
    that is a plausible card is redacted, the other groups stay."""
    text = m.group()
    groups = [(g.start(), g.end()) for g in _DIGIT_RUN.finditer(text)]
    # a group glued to a letter, "_" or "." (an identifier, a decimal, a version) is no card's
    # first or last group; an escape ("\n") before the run is a line break, not glue
    start, end, string = m.start(), m.end(), m.string
    before = string[max(0, start - 2):start]
    prev = before[-1:]
    escaped = before[:1] == "\\" and prev in ("n", "r", "t")
    if prev and (prev.isalnum() or prev in ("_", ".")) and not escaped:
        groups.pop(0)
    after = string[end:end + 2]
    if groups and (after[:1].isalnum() or after[:1] == "_"
                   or (after[:1] == "." and after[1:].isdigit())):
        groups.pop()
    out: list[str] = []
    pos = i = 0
    while i < len(groups):
        if text[groups[i][0]] not in "23456":  # no card network's number starts otherwise
            i += 1
            continue
        digits = 0
        for j in range(i, len(groups)):
            digits += groups[j][1] - groups[j][0]
            if digits > 19:
                break
            if digits >= 13 and _luhn_card(text[groups[i][0]:groups[j][1]]):
                out.append(text[pos:groups[i][0]])
                out.append("[REDACTED:card_number]")
                pos = groups[j][1]
                i = j
                break
        i += 1
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


# Names whose value is a secret whatever it looks like (in an assignment, or as a dict key).
_KEY_NAMES = (r"(?:password|passwd|pwd|passphrase|secret|api[_-]?key|apikey|access[_-]?key"
                r"|private[_-]?key|token|credentials?|signature|sig|cookie)")
_TOKEN_CHARS = "[A-Za-z0-9_-]"  # noqa: S105 - a character class

DEFAULT_RULES: tuple[Rule, ...] = (
    # gitleaks private-key; a block cut short (no END line) is redacted to its last base64 char
    Rule("private_key",
         r"-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----"
         r"(?:[\s\S]{0,16384}?-----END[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----"
         r"|[A-Za-z0-9+/=\s\\:,-]*)",
         r"PRIVATE KEY", keywords=("PRIVATE KEY",)),
    # RFC 3986 userinfo: scheme://user:password@host keeps scheme, user and host
    Rule("url_password",
         r"(?<=[A-Za-z0-9+.-])://[^\s:/?#@\[\]\"'<>]*:([^\s/?#\"'<>]+)@",
         r"://[^\s/?#@]*:[^\s/?#]*@", keywords=("://",)),
    Rule("authorization",
         r"(?i)authorization[\"'\\]*\s*[:=]\s*[\"'\\]*"
         r"(?:(?:basic|bearer|token|digest|negotiate|apikey)\s+)?(?!\[REDACTED:)"
         r"([^\s\"'\\,;]{6,})",
         r"(?i)authorization", ikeywords=("authorization",)),
    Rule("bearer", r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{8,}=*)", r"(?i)bearer",
         ikeywords=("bearer",)),
    # gitleaks anthropic-api-key / anthropic-admin-api-key (any length, any version)
    Rule("anthropic_key", _after("sk-ant-") + r"[A-Za-z0-9_\-]{20,}",
         r"sk-ant-" + _TOKEN_CHARS + "{20}", keywords=("sk-ant-",)),
    # gitleaks openai-api-key, broadened: project, service-account, admin and legacy keys
    Rule("openai_key", _after("sk-") + r"(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",
         r"sk-" + _TOKEN_CHARS + "{20}", keywords=("sk-",)),
    # gitleaks gcp-api-key
    Rule("google_key", r"AIza[0-9A-Za-z_\-]{35}", r"AIza" + _TOKEN_CHARS + "{35}",
         keywords=("AIza",)),
    # gitleaks github-pat, -oauth, -app-token, -refresh-token, -fine-grained-pat
    Rule("github_token", r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
         r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}",
         keywords=("gh", "github_pat_")),
    # gitleaks gitlab-*: pat, deploy, pipeline trigger, runner, CI build, feature flag, feed,
    # incoming mail, kubernetes agent, oauth app secret, SCIM, session cookie, runner auth
    Rule("gitlab_token",
         r"gl(?:pat|dt|ptt|rt|ft|ffct|imt|agent|oas|soat)-[A-Za-z0-9_.\-]{20,}"
         r"|glcbt-[0-9a-zA-Z]{1,5}_[A-Za-z0-9_\-]{20,}|GR1348941[A-Za-z0-9_\-]{20,}"
         r"|_gitlab_session=[0-9a-z]{32}",
         r"gl(?:pat|dt|ptt|rt|ft|ffct|imt|agent|oas|soat)-[A-Za-z0-9_.\-]{20}"
         r"|glcbt-[0-9a-zA-Z]{1,5}_[A-Za-z0-9_\-]{20}|GR1348941[A-Za-z0-9_\-]{20}"
         r"|_gitlab_session=[0-9a-z]{32}",
         keywords=("gl", "GR1348941", "_gitlab_session")),
    # gitleaks slack-bot/-user/-app/-config/-legacy tokens
    Rule("slack_token",
         r"xox[abeoprs]-[A-Za-z0-9\-]{10,}|xoxe\.xox[bp]-[0-9]-[A-Za-z0-9]{20,}"
         r"|(?i:xapp)-[0-9]-[A-Za-z0-9]+-[0-9]+-[A-Za-z0-9]+",
         r"xox[abeoprs]-[A-Za-z0-9\-]{10}|xoxe\.xox[bp]-|(?i)xapp-[0-9]-",
         keywords=("xox",), ikeywords=("xapp",)),
    # gitleaks slack-webhook-url
    Rule("slack_webhook",
         r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_\-]{20,}",
         r"hooks\.slack\.com/", keywords=("hooks.slack.com",)),
    # gitleaks stripe-access-token, plus webhook signing secrets
    Rule("stripe_key",
         r"(?:" + _after("sk", "A-Za-z0-9") + "|" + _after("rk", "A-Za-z0-9")
         + r")_(?:test|live|prod)_[A-Za-z0-9]{10,99}|whsec_[A-Za-z0-9]{20,}",
         r"(?:sk|rk)_(?:test|live|prod)_[A-Za-z0-9]{10}|whsec_[A-Za-z0-9]{20}",
         keywords=("k_", "whsec_")),
    # gitleaks huggingface-access-token / huggingface-organization-api-token
    Rule("huggingface_token", r"(?:hf|api_org)_[A-Za-z0-9]{30,}",
         r"(?:hf|api_org)_[A-Za-z0-9]{30}", keywords=("_",)),
    # gitleaks aws-access-token (key ids of long-term and temporary credentials)
    Rule("aws_access_key",
         r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)(?<![A-Z0-9]....)[A-Z0-9]{16}(?![A-Z0-9])",
         r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}", keywords=("A",)),
    Rule("aws_secret_key",
         r"(?i)aws_?secret_?(?:access_?)?key[\"'\\]*\s*[:=]\s*[\"'\\]*([A-Za-z0-9/+=]{40})"
         r"(?![A-Za-z0-9/+=])",
         r"(?i)aws_?secret_?(?:access_?)?key", ikeywords=("secret",)),
    # gitleaks jwt, with or without a scheme in front; the signature may be empty (alg none)
    Rule("jwt", r"ey[A-Za-z0-9_\-]{10,}\.ey[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-+/=]*",
         r"ey[A-Za-z0-9_\-]{10,}\.ey[A-Za-z0-9_\-]{10}", keywords=(".ey",)),
    # key = value, key: value, "key": "value", ?key=value for names like a secret's
    Rule("secret",
         r"(?i)" + _KEY_NAMES + r"(?![a-z0-9_])[\"'\\]*\s*[:=]\s*"
         r"(?!\\?[\"']?\[REDACTED:)"  # already redacted by a more specific rule
         r"(?:\\?\"([^\"\\\n]{1,256})\\?\"|'([^'\n]{1,256})'|([^\s\"'\\,;&<>{}\[\]()]{1,256}))",
         r"(?i)" + _KEY_NAMES + r"(?:[^a-z0-9_]|$)",
         ikeywords=("pass", "pwd", "secret", "key", "token", "credential", "sig", "cookie")),
    Rule("email",
         r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b",
         r"[A-Za-z0-9._%+\-]@[A-Za-z0-9.\-]+\.[A-Za-z]{2}", keywords=("@",)),
    Rule("card_number",
         # a whole run of digit groups with 13+ digits, from its first digit, once
         r"[0-9](?<![0-9].)(?<![0-9][ -].)(?:[ -]?[0-9]){12,}+",  # digit first: fast search
         r"[0-9](?:[ -]?[0-9]){12}", replace=_redact_cards, worth_trying=_enough_digits),
)

_CACHE_MAX_LEN = 256
_CACHE_SIZE = 4096

_Compiled = tuple[Callable[..., str], tuple[str, ...], tuple[str, ...],
                  Callable[[str], bool] | None, Any]


@functools.cache
def _compile(rules: tuple[Rule, ...]) -> tuple[_Compiled, ...]:
    """The rules' Python patterns and replacements."""
    return tuple((re.compile(r.pattern).sub, r.keywords, r.ikeywords, r.worth_trying,
                  _replacer(r)) for r in rules)


@functools.cache
def _gates(rules: tuple[Rule, ...]) -> tuple[Any, Any, Any] | None:
    """The rules' RE2 gate (all triggers in one pattern), set and batch gate (the gate in
    multi-line mode, for :meth:`Redactor.many`), or None without RE2.

    Raises OSError (not cached: the next call tries again) when RE2 cannot be loaded right
    now, e.g. while the process has no file descriptors left.
    """
    try:  # RE2 scans for every rule's trigger at once, in linear time; without it the rules
        import re2 as _re2  # run one by one (the same results, slower: see BENCHMARKS.md)
    except ImportError:  # pragma: no cover - the test extra installs it
        return None
    if not rules:
        return None
    options = _re2.Options()
    options.max_mem = 64 << 20
    triggers = "|".join(f"(?:{r.trigger})" for r in rules)
    gate = _re2.compile(triggers, options)
    which = _re2.Set.SearchSet(options)
    for r in rules:
        which.Add(r.trigger)
    which.Compile()
    return gate, which, _re2.compile(f"(?m){triggers}", options)


_UNSET: Any = object()


class Redactor:
    """Replaces secrets and personal data in text with ``[REDACTED:<kind>]``.

    ``patterns`` adds the user's own regular expressions (redacted as ``[REDACTED:custom]``)
    to the built-in rules; ``defaults=False`` keeps only the user's. ``gate=False`` skips the
    RE2 pre-scan (the same results; for comparing the two). Calling the redactor on a text
    returns the redacted text; :meth:`value` redacts data recursively. Redaction is
    idempotent. Short texts (attribute values, task types) are cached, so the strings seen on
    every step cost a dict lookup. Patterns are compiled on first use.
    """

    __slots__ = ("_cache", "_compiled", "_custom", "_gate", "defaults", "gate", "patterns")

    def __init__(self, patterns: Iterable[str | Pattern[str]] = (), *, defaults: bool = True,
                 gate: bool = True) -> None:
        self.patterns = tuple(patterns)
        self.defaults = defaults
        self.gate = gate
        # compiled now, so that a malformed user pattern fails here and not on first use
        self._custom = tuple(p.sub if isinstance(p, Pattern) else re.compile(p).sub
                             for p in self.patterns)
        self._compiled: tuple[_Compiled, ...] | None = None
        self._gate: Any = _UNSET if gate else None
        self._cache: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Redactor(patterns={self.patterns!r}, defaults={self.defaults})"

    def __call__(self, text: str) -> str:
        """``text`` with every secret replaced."""
        short = len(text) <= _CACHE_MAX_LEN
        if short:
            hit = self._cache.get(text)
            if hit is not None:
                return hit
        out = self._redact(text)
        if short:
            cache = self._cache
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[text] = out
        return out

    def many(self, texts: Sequence[str]) -> list[str]:
        """Each of ``texts`` redacted: the same as ``[self(t) for t in texts]``, cheaper for
        many short texts that are all new (the proposals of a batch of step events).

        One RE2 scan of the texts joined by newlines, with the gate in multi-line mode (so
        that ``^`` and ``$`` match at each text's start and end), tells which texts hold a
        trigger; only those are redacted one by one. A trigger found in a text alone is also
        found in the joined texts (no trigger uses ``\\A``, ``\\z`` or ``\\B``, a test checks
        it), and a match that spans a newline flags every text it touches, so the scan flags
        at least the texts that one gate call each would: the result is the same. Per text it
        saves the RE2 wrapper's per-call cost (~1.5 µs), most of redacting a short text.
        """
        return self._many(texts)[0]

    def _many(self, texts: Sequence[str]) -> tuple[list[str], set[int] | None]:
        """:meth:`many`, and the positions of the texts the scan flagged (None: every text
        went through :meth:`__call__`); the others are returned as they are unless the
        redactor has patterns of the user's."""
        gates = self._gates()
        if gates is None or not self._compiled or len(texts) < 2:
            return [self(t) for t in texts], None
        flagged: set[int] = set()
        ends: list[int] | None = None
        try:
            for m in gates[2].finditer("\n".join(texts)):
                if ends is None:  # each text's end, its newline included
                    ends = [end + i + 1 for i, end in enumerate(accumulate(map(len, texts)))]
                start, end = m.span()
                flagged.update(range(bisect_right(ends, start),
                                     bisect_right(ends, max(start, end - 1)) + 1))
        except UnicodeEncodeError:  # lone surrogates: RE2 takes UTF-8 only
            flagged = set(range(len(texts)))
        custom = self._custom
        if not custom:
            out = list(texts)
            for i in flagged:
                out[i] = self(texts[i])
            return out, flagged
        out = []
        for i, text in enumerate(texts):
            clean = text
            if i in flagged:
                clean = self(text)
            else:
                for sub in custom:
                    clean = sub(_CUSTOM, clean)
            out.append(clean)
        return out, None

    def _gates(self) -> tuple[Any, Any, Any] | None:
        """The RE2 gates (:func:`_gates`), None without them; compiles the rules first."""
        rules = DEFAULT_RULES if self.defaults else ()
        if self._compiled is None:
            self._compiled = _compile(rules)
        gate = self._gate
        if gate is _UNSET:
            try:
                gate = self._gate = _gates(rules)
            except OSError:  # RE2 cannot be loaded now: this call runs without the gate
                gate = None
        return gate  # type: ignore[no-any-return]

    def _redact(self, text: str) -> str:
        gate = self._gates()
        compiled = self._compiled
        if compiled:
            if gate is None:
                text = _apply(compiled, text)
            else:
                try:
                    found = gate[0].search(text) is not None
                except UnicodeEncodeError:  # lone surrogates: RE2 takes UTF-8 only
                    text = _apply(compiled, text)
                else:
                    if found:
                        # RE2's search falls back to an NFA when its DFA runs out of memory,
                        # so it never misses; the set (DFA only) may: then every rule runs
                        hits = gate[1].Match(text)
                        text = _apply(tuple(compiled[i] for i in sorted(hits)) if hits
                                      else compiled, text)
        for sub in self._custom:
            text = sub(_CUSTOM, text)
        return text

    def value(self, obj: Any) -> Any:
        """``obj`` with every string in it redacted: dict keys and values, list and tuple
        items, recursively. A string or number under a key named like a secret (``password``,
        ``api_key``, ``token``, ``authorization``…) is replaced whole."""
        kind = type(obj)
        if kind is str:
            hit = self._cache.get(obj)
            return hit if hit is not None else self(obj)
        if kind is dict or (kind is not list and isinstance(obj, Mapping)):
            names = _secret_keys
            out: dict[Any, Any] = {}
            for k, v in obj.items():
                if type(k) is not str:
                    out[k] = self.value(v)
                    continue
                secret = names.get(k)
                if secret is None:
                    secret = _is_secret_key(k)
                vkind = type(v)
                if secret and v and vkind is not bool and isinstance(v, str | int | float):
                    out[self(k)] = _WHOLE
                elif vkind is int or vkind is float or vkind is bool or v is None:
                    out[self(k)] = v
                else:
                    out[self(k)] = self.value(v)
            return out
        if kind is list:
            return [self.value(v) for v in obj]
        if isinstance(obj, str):  # a str subclass
            return self(obj)
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self.value(v) for v in obj)
        return obj

    def attributes(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Span or event attributes redacted: the fast path of :meth:`value` for a flat
        mapping of names (left as they are) to scalars and lists."""
        cache, names = self._cache, _secret_keys
        out: dict[str, Any] = {}
        for k, v in attrs.items():
            secret = names.get(k)
            if secret is None:
                secret = _is_secret_key(k)
            kind = type(v)
            if secret and v and kind is not bool and isinstance(v, str | int | float):
                out[k] = _WHOLE
            elif kind is str:
                hit = cache.get(v)
                out[k] = hit if hit is not None else self(v)
            elif kind is int or kind is bool or kind is float or v is None:
                out[k] = v
            else:
                out[k] = self.value(v)
        return out


_CUSTOM = "[REDACTED:custom]"
_WHOLE = "[REDACTED:secret]"


def _apply(compiled: tuple[_Compiled, ...], text: str) -> str:
    lowered: str | None = None
    for sub, keywords, ikeywords, worth_trying, replacement in compiled:
        if worth_trying is not None and not worth_trying(text):
            continue
        if keywords or ikeywords:
            for k in keywords:
                if k in text:
                    break
            else:
                if not ikeywords:
                    continue
                if lowered is None:
                    lowered = text.lower()
                for k in ikeywords:
                    if k in lowered:
                        break
                else:
                    continue
        redacted = sub(replacement, text)
        if redacted is not text:
            text, lowered = redacted, None
    return text


_secret_keys: dict[str, bool] = {}


@functools.cache
def _key_name_pattern() -> Pattern[str]:
    return re.compile(r"(?i)(?:" + _KEY_NAMES + r"|authorization)$")


def _is_secret_key(key: str) -> bool:
    known = _secret_keys.get(key)
    if known is None:
        known = _key_name_pattern().search(key) is not None
        if len(_secret_keys) < _CACHE_SIZE:
            _secret_keys[key] = known
    return known


def _replacer(rule: Rule) -> str | Callable[[re.Match[str]], str]:
    if rule.replace is not None:
        return rule.replace
    marker = f"[REDACTED:{rule.kind}]"
    check = rule.check
    if check is None and re.compile(rule.pattern).groups == 0:
        return marker

    def replace(m: re.Match[str]) -> str:
        whole = m.group()
        if check is not None and not check(whole):
            return whole
        if m.lastindex is None:
            return marker
        start = m.start()
        parts: list[str] = []
        pos = 0
        for g in range(1, m.re.groups + 1):
            s, e = m.span(g)
            if s < 0:
                continue
            parts.append(whole[pos:s - start])
            parts.append(marker)
            pos = e - start
        parts.append(whole[pos:])
        return "".join(parts)

    return replace


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` with the cut marked and the original length stated."""
    if len(text) <= max_chars:
        return text
    marker = f"…[truncated {len(text) - max_chars} of {len(text)} chars]"
    return text[:max_chars] + marker


_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|sslpassword|pass|token|access_token|auth_token|"
    r"api_key|apikey|secret|client_secret|key|p)=).*")
"""A secret query parameter and everything after it: an unencoded secret may hold ``&``,
``;``, ``#`` and ``name=`` pairs of its own, so no later character can be shown safely."""
_PORT = re.compile(r"\d*")


def shown_url(url: str) -> str:
    """``url`` without its secrets, for messages, logs and output -- even when malformed.

    Masks the password of the authority (``user:***@host``; the user name stays, it says
    which account), including a password holding an unencoded ``@``, ``/`` or ``:``, and the
    values of query parameters named like a secret (``?password=``, ``?token=``…) with the rest
    of the URL after them (an unencoded secret may hold ``&``, ``#``, ``=``). A URL that
    cannot be parsed has everything between ``//`` and its last ``@`` masked. Control (Redis
    URLs), the store (database URLs) and the command line all show URLs through this one
    function, so it lives here, with the rest of what keeps secrets out of output.
    """
    text = _without_password(url.strip())
    query = text.find("?")  # after the authority's password is gone: a "?" of the query
    if query < 0:
        return text
    return text[:query] + _SECRET_PARAM.sub(r"\1***", text[query:])


def _without_password(text: str) -> str:
    """``text`` with the password of its authority masked (see :func:`shown_url`)."""
    start = text.find("//")
    if start < 0:
        return text
    rest = text[start + 2:]
    end = len(rest)
    for mark in "?#":
        found = rest.find(mark)
        if found >= 0:
            end = min(end, found)
    at = rest.rfind("@", 0, end)
    if at < 0:
        # no @ before the query: a password holding "?" or "#" ("//:pa?ss@host") leaves a
        # colon that is no port in what would be the host
        host = re.split(r"[/?#]", rest, maxsplit=1)[0]
        _, colon, port = host.partition(":")
        if not colon or _PORT.fullmatch(port):
            return text
        at = rest.rfind("@")
        if at < 0:
            return text
    userinfo = rest[:at]
    first_slash = userinfo.find("/")
    if first_slash >= 0:
        # "u:pa/ss@host": a slash before the last @ belongs to the password unless what
        # precedes it is a plain host[:port] (then the @ is in the path, e.g. a file name)
        head = userinfo[:first_slash]
        _, _, port = head.partition(":")
        if not head or ":" not in head or _PORT.fullmatch(port):
            return text
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return text
    return f"{text[:start + 2]}{user}:***@{rest[at + 1:]}"


# -- the process default ------------------------------------------------------------------
# The process's redactor is the current runtime's (closedloop._runtime): configure() and
# reset() set it with the rest. A runtime without one of its own uses the built-in rules.

BUILTIN = Redactor()
"""The built-in rules only: the redactor of a runtime not given one."""


def default_redactor() -> Redactor:
    """The redactor closedloop applies to everything it stores, exports and logs: the
    current runtime's (:func:`closedloop.configure`), else :data:`BUILTIN`."""
    redactor = _runtime._current._redactor
    return redactor if redactor is not None else BUILTIN


def set_default_redactor(redactor: Redactor) -> Redactor:
    """Install ``redactor`` in the current runtime (e.g. ``Redactor([r"ACCT-\\d{6}"])`` to
    add your own patterns); returns the previous one."""
    return _runtime._current.set_redactor(redactor)


def reset_default_redactor() -> None:
    """Back to the built-in rules only."""
    _runtime._current.set_redactor(None)


def redact_text(text: str) -> str:
    """``text`` redacted by the process default redactor."""
    return default_redactor()(text)


def redact_value(obj: Any) -> Any:
    """``obj`` (str, dict, list, tuple, nested) redacted by the process default redactor."""
    return default_redactor().value(obj)


def clip(text: str, max_chars: int) -> str:
    """``text`` redacted, then truncated to ``max_chars`` (never the other way round)."""
    return truncate(default_redactor()(text), max_chars)


_EVENT_TEXTS = tuple(EVENT_FIELDS.index(f) for f in (
    "error_message", "run_id", "model", "provider", "agent_version", "prompt_version"))
_EVENT_DATA = (EVENT_FIELDS.index("detail"), EVENT_FIELDS.index("labels"))
_PROPOSAL = EVENT_FIELDS.index("proposal")
_MESSAGE, _DETAIL = _EVENT_TEXTS[0], _EVENT_DATA[0]
_V3_REDACTED = (*_EVENT_TEXTS[1:], _EVENT_DATA[1])
_v3_redacted = itemgetter(*_V3_REDACTED)  # one C call tells whether any of them is set
_proposal_of = itemgetter(_PROPOSAL)
_OTHER_TEXTS = tuple(itemgetter(i) for i in (_MESSAGE, _DETAIL, *_V3_REDACTED))
"""Every field :func:`redact_event` redacts but the proposal."""


def redact_event(event: StepEvent) -> StepEvent:
    """A step event with its free text redacted: ``error_message``, ``detail``, the run id,
    model, provider and versions, the labels, and the proposal (then cut to its cap,
    :func:`closedloop._events.clip_proposal`). Ids, digests and numbers are left alone.

    The event itself when nothing changes (most events: a clean proposal and no other text);
    else a copy."""
    if event[_MESSAGE] is None and event[_DETAIL] is None and event[_PROPOSAL] is None \
            and _v3_redacted(event).count(None) == len(_V3_REDACTED):
        return event  # nothing to redact
    return _redact_event(event, default_redactor(), None)


def redact_events(events: Sequence[StepEvent]) -> list[StepEvent]:
    """:func:`redact_event` of each event (what the store's writer stores), the batch's
    proposals redacted together (:meth:`Redactor.many`: every proposal is a new text, so
    one by one each would pay a gate call of its own)."""
    n = len(events)
    proposals = list(map(_proposal_of, events))
    if n < 2 or set(map(type, proposals)) != {str}:  # not a batch of a loop's steps
        return [redact_event(e) for e in events]
    redactor = default_redactor()
    cleaned, flagged = redactor._many(proposals)
    cut = max(map(len, cleaned)) > PROPOSAL_MAX_CHARS
    # any other text to redact? (a pass per field, at C speed, allocating nothing; an empty
    # text or dict needs no redaction)
    other = any(any(map(field, events)) for field in _OTHER_TEXTS)
    if flagged is not None and not flagged and not cut and not other:
        return list(events)  # most batches: clean proposals and no other text to redact
    out: list[StepEvent] = []
    for event, proposal, text in zip(events, proposals, cleaned, strict=True):
        clean = clip_proposal(text)
        if other and any(field(event) for field in _OTHER_TEXTS):
            out.append(_redact_event(event, redactor, clean))
        elif clean is not proposal and clean != proposal:
            values = list(event)
            values[_PROPOSAL] = clean
            out.append(tuple.__new__(type(event), values))
        else:
            out.append(event)
    return out


def _redact_event(event: StepEvent, redactor: Redactor, proposal_clean: str | None,
                  ) -> StepEvent:
    """``event`` redacted; ``proposal_clean`` is its proposal's redacted text when known."""
    message, detail, proposal = event[_MESSAGE], event[_DETAIL], event[_PROPOSAL]
    v3 = _v3_redacted(event).count(None) != len(_V3_REDACTED)  # any of them set
    values: list[Any] | None = None  # copied on the first change: most texts have nothing
    if message is not None or v3:
        for i in _EVENT_TEXTS:
            text = event[i]
            if isinstance(text, str):
                clean = redactor(text)
                if clean is not text and clean != text:
                    if values is None:
                        values = list(event)
                    values[i] = clean
    if detail is not None or v3:
        for i in _EVENT_DATA:
            data = event[i]
            if data is not None:
                if values is None:
                    values = list(event)
                values[i] = redactor.value(data)
    if isinstance(proposal, str):
        clean = proposal_clean if proposal_clean is not None \
            else clip_proposal(redactor(proposal))
        # the redactor's cache may hand back an equal text that is another object
        if clean is not proposal and clean != proposal:
            if values is None:
                values = list(event)
            values[_PROPOSAL] = clean
    if values is None:
        return event
    return tuple.__new__(type(event), values)  # _replace, without its per-call overhead


# -- log lines ----------------------------------------------------------------------------

class RedactingFilter(logging.Filter):
    """A logging filter that redacts a record's message (with its arguments), its traceback
    and its stack; installed on closedloop's own loggers."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = default_redactor()
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's business to report
            return True
        try:
            record.msg = redactor(message)
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redactor(record.exc_text)
            if record.stack_info:
                record.stack_info = redactor(record.stack_info)
        except Exception:  # noqa: BLE001 - fail closed: say so rather than log unredacted text
            record.msg, record.args = "[closedloop: log line withheld, redaction failed]", None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


LOG_FILTER = RedactingFilter()
LOGGERS = ("closedloop", "closedloop.autonomy", "closedloop.control", "closedloop.integrations",
           "closedloop.learn", "closedloop.store", "closedloop.telemetry")
"""Every logger closedloop logs on (a test checks the package uses no other)."""


def install_log_filter(names: Iterable[str] = LOGGERS) -> None:
    """Put :data:`LOG_FILTER` on the named loggers (logger filters are not inherited by
    child loggers, so each one gets it); done once at import."""
    for name in names:
        logger = logging.getLogger(name)
        if LOG_FILTER not in logger.filters:
            logger.addFilter(LOG_FILTER)


install_log_filter()
