"""Outcome verification: after acting, does the real state match the intent?

A verifier is called as ``verifier(intent, result)`` — the task input and what the executor
returned — and returns a :class:`~closedloop.Verdict` reporting every mismatch at once. A
verifier that cannot reach or read its target says *unknown*
(:meth:`~closedloop.Verdict.cannot_tell`), which the loop records as a failed verification
(``verification_unknown``), never as success.

- :class:`Ec2InstanceVerifier` (boto3): instance type, security groups, tags, state, subnet/VPC
- :class:`HttpVerifier` / :class:`AsyncHttpVerifier` (httpx): status, JSON-path values, latency
- :class:`SqlVerifier` (any DB-API connection): rows or a per-row predicate
- :class:`Eventually` / :class:`AsyncEventually`: poll until the state converges or a deadline
"""

from closedloop.verify._ec2 import Ec2InstanceVerifier, InstanceExpectation
from closedloop.verify._http import AsyncHttpVerifier, HttpVerifier, parse_path
from closedloop.verify._poll import AsyncEventually, Eventually
from closedloop.verify._sql import SqlVerifier

__all__ = [
    "AsyncEventually",
    "AsyncHttpVerifier",
    "Ec2InstanceVerifier",
    "Eventually",
    "HttpVerifier",
    "InstanceExpectation",
    "SqlVerifier",
    "parse_path",
]
