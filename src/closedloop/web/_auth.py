"""Who uses the dashboard, and what they may do: people, roles, sessions and CSRF tokens.

- **People.** Each has a name, a role and a token of their own, from
  ``$CLOSEDLOOP_DASHBOARD_USERS`` (``name:role:token`` entries separated by commas or
  whitespace); the API token (``$CLOSEDLOOP_API_TOKEN``) also signs in, as ``admin``.
- **Roles.** ``viewer`` reads; ``approver`` also approves and rejects requests; ``admin``
  also resumes halted task types (and will promote and demote them).
- **Sessions.** Signing in (a form that takes the token) sets an ``HttpOnly``,
  ``SameSite=Strict`` cookie naming a server-side session (kept in this process: a restart
  signs everyone out); a session lasts :data:`SESSION_S` seconds.
- **CSRF.** Each session has a random token that every form carries in a hidden field; a
  POST whose field does not match (compared in constant time), or whose ``Origin`` is not
  this server, is refused.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from hashlib import sha256

from closedloop._errors import ConfigError
from closedloop.web._config import check_token

USERS_ENV = "CLOSEDLOOP_DASHBOARD_USERS"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 10_000
COOKIE = "closedloop_session"


class Role(IntEnum):
    """What a person may do; each role may do everything the ones below it may."""

    VIEWER = 1
    APPROVER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise ConfigError(f"unknown dashboard role {value[:40]!r}: use viewer, approver "
                              "or admin") from None


@dataclass(frozen=True, slots=True)
class User:
    """A person who signs in: ``name`` (recorded as who decided), ``role``, and the digest of
    their token."""

    name: str
    role: Role
    digest: bytes = field(repr=False)


def make_user(name: str, role: Role | str, token: str) -> User:
    """A user; the name is 1-64 printable characters without ``:``, the token as the API's."""
    checked = check_token(token)
    if checked is None:
        raise ConfigError(f"dashboard user {name[:40]!r} needs a token")
    if not 1 <= len(name) <= 64 or not all(c.isprintable() and c not in ": ," for c in name):
        raise ConfigError("a dashboard user's name must be 1-64 printable characters without "
                          "spaces, ':' or ','")
    return User(name, role if isinstance(role, Role) else Role.parse(role),
                sha256(checked.encode()).digest())


def parse_users(text: str | None) -> list[User]:
    """The users of ``$CLOSEDLOOP_DASHBOARD_USERS`` (``name:role:token``, comma- or
    space-separated); a :class:`~closedloop.ConfigError` that never shows a token."""
    out: list[User] = []
    for entry in (text or "").replace(",", " ").split():
        parts = entry.split(":", 2)
        if len(parts) != 3:
            raise ConfigError(f"${USERS_ENV}: each entry is name:role:token")
        out.append(make_user(parts[0], parts[1], parts[2]))
    names = [u.name for u in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"${USERS_ENV}: a name appears twice")
    return out


@dataclass(slots=True)
class Session:
    """A signed-in person: who, until when, and the CSRF token of their forms."""

    user: User
    csrf: str
    expires: float


class Sessions:
    """The server-side sessions of one process (bounded; the oldest go first)."""

    def __init__(self, users: Iterable[User], *, clock: Callable[[], float] = time.time,
                 ttl: float = SESSION_S) -> None:
        self.users = list(users)
        self.clock = clock
        self.ttl = ttl
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def authenticate(self, token: str) -> User | None:
        """The user whose token this is (every token is compared, in constant time)."""
        digest = sha256(token.strip().encode("utf-8", "replace")).digest()
        found = None
        for user in self.users:
            if hmac.compare_digest(digest, user.digest):
                found = user
        return found

    def start(self, user: User) -> tuple[str, Session]:
        """A new session for ``user``: its id (the cookie's value) and the session."""
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self.clock() + self.ttl)
        with self._lock:
            self._prune()
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session ``sid`` names, or None."""
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is not None and session.expires <= self.clock():
                del self._by_id[sid]
                return None
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)

    def _prune(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]


def csrf_ok(session: Session | None, given: str | None) -> bool:
    """True when ``given`` is the session's CSRF token."""
    if session is None or not given:
        return False
    return hmac.compare_digest(session.csrf.encode(), given.encode("utf-8", "replace"))
