"""Real boto3 against a local EC2 API: moto's threaded server, the executor, the verifier.

:class:`LocalEc2` starts moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port) and gives a
boto3 EC2 client pointed at it with dummy credentials passed to the client: the user's
environment and AWS configuration are never touched, and nothing leaves the machine.
:class:`Ec2Executor` applies a plan with ``run_instances`` (or, if the loop ever let one
through, the destructive calls it asks for); :class:`InstanceMatchesRequest` reads the
instances back with ``describe_instances`` and reports every difference from the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from moto.server import ThreadedMotoServer

from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Verdict
from closedloop.demo._model import SECURITY_GROUPS, ProvisionRequest
from closedloop.demo._plan import DeleteSecurityGroup, RunInstances, parse_plan
from closedloop.loop import current_idempotency_key

REGION = "us-east-1"
IMAGE_ID = "ami-03cf127a"
"""An Amazon Linux image moto ships with; moto does not check it, real EC2 would."""
PRODUCTION_INSTANCES = 3
_LIVE_STATES = frozenset({"pending", "running"})
VPC_CIDR = "10.42.0.0/16"
"""The demo's VPC: a /16, the largest block EC2 allows; its subnet is sized to the run."""
_RESERVED_PER_SUBNET = 5  # EC2 (and moto) keep a subnet's first four addresses and its last
REQUEST_TAG = "closedloop-request"
"""The tag an approved launch carries: the approval request's id (its idempotency key)."""
MAX_LAUNCHES = 2 ** 16 - _RESERVED_PER_SUBNET - PRODUCTION_INSTANCES
"""Most instances a run may launch: a subnet as large as the VPC, less the production ones."""


def subnet_for(instances: int) -> str:
    """The smallest subnet of the VPC (a /28 at least) with an address for ``instances``.

    Raises :class:`~closedloop.ConfigError` past what the whole VPC holds.
    """
    for prefix in range(28, 15, -1):
        if 2 ** (32 - prefix) - _RESERVED_PER_SUBNET >= instances:
            return f"10.42.0.0/{prefix}"
    raise ConfigError(f"{instances} instances do not fit in the demo's VPC ({VPC_CIDR}: at most "
                      f"{2 ** 16 - _RESERVED_PER_SUBNET})")


class _QuietRequests(logging.Filter):
    """Drops werkzeug's log while the local server runs: one line per request, and the
    traceback of every request moto fails on (its client gets the error, and the loop
    records it as the step's error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class LocalEc2:
    """A local EC2 API (moto) and a boto3 client for it; a context manager.

    Starts on ``__enter__``, stops on ``__exit__``. moto keeps its state in this process,
    so every demo run creates its own VPC and reads back only the ids it created.
    """

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self._server: ThreadedMotoServer | None = None
        self._client: Any = None
        self._filter = _QuietRequests()

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._server is None:
            raise RuntimeError("LocalEc2 is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def client(self) -> Any:
        """The boto3 EC2 client (a ``botocore`` client: untyped here)."""
        if self._client is None:
            raise RuntimeError("LocalEc2 is not started")
        return self._client

    def start(self) -> None:
        """Start the server on a free port and connect a client to it."""
        logging.getLogger("werkzeug").addFilter(self._filter)
        # port 0: the OS picks a free port at bind time, so two demos never collide
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        # dummy credentials, given to this client only: moto accepts any
        session = boto3.session.Session(
            aws_access_key_id="closedloop-demo",
            aws_secret_access_key="closedloop-demo",  # noqa: S106 - not a secret, see above
            region_name=self.region)
        # proxies={}: never route 127.0.0.1 through the user's HTTP(S)_PROXY
        self._client = session.client(
            "ec2", endpoint_url=self.endpoint_url,
            config=Config(proxies={}, retries={"max_attempts": 2, "mode": "standard"}))

    def stop(self) -> None:
        """Close the client and stop the server (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        logging.getLogger("werkzeug").removeFilter(self._filter)

    def __enter__(self) -> LocalEc2:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoEnvironment:
    """What the demo sets up before the agent runs: a VPC, groups, and production instances."""

    vpc_id: str
    subnet_id: str
    security_groups: dict[str, str]
    """Group name → group id."""
    production_instance_ids: tuple[str, ...]


def provision_environment(client: Any, *, launches: int) -> DemoEnvironment:
    """Create the VPC, subnet, security groups and the running "production" instances.

    The subnet has an address for the production instances and ``launches`` more (at most
    :data:`MAX_LAUNCHES`): an instance that finds no address fails to launch.
    """
    cidr = subnet_for(PRODUCTION_INSTANCES + launches)
    vpc_id = client.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    subnet_id = client.create_subnet(VpcId=vpc_id, CidrBlock=cidr)["Subnet"]["SubnetId"]
    groups = {
        name: client.create_security_group(
            GroupName=name, Description=f"closedloop demo: {name}", VpcId=vpc_id)["GroupId"]
        for name in SECURITY_GROUPS
    }
    production = client.run_instances(
        ImageId=IMAGE_ID, InstanceType="m5.large", MinCount=PRODUCTION_INSTANCES,
        MaxCount=PRODUCTION_INSTANCES, SubnetId=subnet_id,
        SecurityGroupIds=[groups["web"], groups["ssh"]],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "env", "Value": "production"}, {"Key": "owner", "Value": "platform"},
            {"Key": "Name", "Value": "prod-api"}]}],
    )["Instances"]
    return DemoEnvironment(vpc_id=vpc_id, subnet_id=subnet_id, security_groups=groups,
                           production_instance_ids=tuple(i["InstanceId"] for i in production))


def count_running(client: Any, instance_ids: tuple[str, ...]) -> int:
    """How many of ``instance_ids`` are pending or running."""
    if not instance_ids:
        return 0
    reservations = client.describe_instances(InstanceIds=list(instance_ids))["Reservations"]
    return sum(1 for r in reservations for i in r["Instances"]
               if i["State"]["Name"] in _LIVE_STATES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """What the executor did: the API call and the resources it touched."""

    call: str
    ids: tuple[str, ...]


class Ec2Executor:
    """Applies a validated plan to EC2 with boto3: ``executor(proposal_text) -> Action``.

    Security groups are named in the plan and resolved to the environment's group ids; an
    unknown name is an error (recorded by the loop as an executor error). An approved plan
    runs with the approval request's id as its idempotency key
    (:func:`closedloop.current_idempotency_key`), passed as ``ClientToken`` of
    ``RunInstances`` (real EC2 launches once per token) and as the instances' tag
    :data:`REQUEST_TAG`; before launching, the executor looks for live instances carrying
    that tag and returns them instead. moto does not deduplicate by ``ClientToken``, the tag
    does: a second execution of one request (a crashed one a human retried) never launches
    a second instance.
    """

    name = "ec2"

    def __init__(self, client: Any, env: DemoEnvironment) -> None:
        self._client = client
        self._env = env

    def __call__(self, proposal: str) -> Action:
        plan = parse_plan(proposal)
        if isinstance(plan, RunInstances):
            unknown = [g for g in plan.security_groups if g not in self._env.security_groups]
            if unknown:
                raise ValueError(f"unknown security groups {unknown}")
            tags = [{"Key": k, "Value": v} for k, v in plan.tags.items()]
            key = current_idempotency_key()
            extra = {"ClientToken": key} if key is not None else {}
            if key is not None:
                done = self._launched(key)
                if done:  # this request already launched: the same instances, not new ones
                    return Action(call="run_instances", ids=done)
                tags.append({"Key": REQUEST_TAG, "Value": key})
            response = self._client.run_instances(**extra,
                ImageId=IMAGE_ID, InstanceType=plan.instance_type, MinCount=plan.count,
                MaxCount=plan.count, SubnetId=self._env.subnet_id,
                SecurityGroupIds=[self._env.security_groups[g] for g in plan.security_groups],
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}] if tags else [],
            )
            return Action(call="run_instances",
                          ids=tuple(i["InstanceId"] for i in response["Instances"]))
        if isinstance(plan, DeleteSecurityGroup):
            group_id = self._env.security_groups[plan.group]
            self._client.delete_security_group(GroupId=group_id)
            return Action(call="delete_security_group", ids=(group_id,))
        self._client.terminate_instances(InstanceIds=plan.instance_ids)
        return Action(call="terminate_instances", ids=tuple(plan.instance_ids))

    def _launched(self, key: str) -> tuple[str, ...]:
        """The live instances an execution under ``key`` launched (none: not launched)."""
        reservations = self._client.describe_instances(Filters=[
            {"Name": f"tag:{REQUEST_TAG}", "Values": [key]},
            {"Name": "instance-state-name", "Values": sorted(_LIVE_STATES)}])["Reservations"]
        return tuple(sorted(i["InstanceId"] for r in reservations for i in r["Instances"]))


class InstanceMatchesRequest:
    """Outcome verification: the launched instance is what the user asked for.

    ``verifier(request, action) -> Verdict``. Reads the instance back with
    ``describe_instances`` and compares instance type, the set of security groups and every
    requested tag with the request (the intent, not the plan), reporting every difference
    at once, one issue each (``instance.instance_type``, ``instance.security_groups``,
    ``instance.tags.owner``…). An API error is "cannot tell", never a pass.
    """

    name = "instance_matches_request"

    def __init__(self, client: Any, env: DemoEnvironment) -> None:
        self._client = client
        self._group_names = {gid: name for name, gid in env.security_groups.items()}

    def __call__(self, request: ProvisionRequest | dict[str, Any], action: Action) -> Verdict:
        if not isinstance(request, ProvisionRequest):  # a worker has the stored JSON
            request = ProvisionRequest.from_data(request)
        if action.call != "run_instances":
            return Verdict.fail(Issue(message=f"expected one launched instance, the agent ran "
                                      f"{action.call} on {list(action.ids)}",
                                      code="wrong_action", location="instance"))
        try:
            reservations = self._client.describe_instances(
                InstanceIds=list(action.ids))["Reservations"]
        except (ClientError, BotoCoreError) as exc:
            return Verdict.cannot_tell(f"describe_instances failed: {exc}")
        instances = [i for r in reservations for i in r["Instances"]]
        if len(instances) != 1:
            return Verdict.fail(Issue(
                message=f"expected 1 instance, found {len(instances)}: {list(action.ids)}",
                code="count", location="instance.count"))
        return Verdict(issues=tuple(self._compare(request, instances[0])))

    def _compare(self, request: ProvisionRequest, instance: dict[str, Any]) -> list[Issue]:
        issues = []
        iid = instance["InstanceId"]
        state = instance["State"]["Name"]
        if state not in _LIVE_STATES:
            issues.append(Issue(message=f"{iid} is {state}", code="state",
                                location="instance.state"))
        if instance["InstanceType"] != request.instance_type:
            issues.append(Issue(
                message=f"{iid} is a {instance['InstanceType']}, requested "
                        f"{request.instance_type}",
                code="instance_type", location="instance.instance_type"))
        actual = {self._group_names.get(g["GroupId"], g["GroupId"])
                  for g in instance.get("SecurityGroups", [])}
        wanted = set(request.security_groups)
        for group in sorted(wanted - actual):
            issues.append(Issue(message=f"{iid} is missing security group {group!r}",
                                code="security_group_missing",
                                location="instance.security_groups"))
        for group in sorted(actual - wanted):
            issues.append(Issue(message=f"{iid} has unrequested security group {group!r}",
                                code="security_group_unexpected",
                                location="instance.security_groups"))
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        for key, value in request.tags.items():
            if key not in tags:
                issues.append(Issue(message=f"{iid} has no tag {key!r} (wanted {value!r})",
                                    code="tag_missing", location=f"instance.tags.{key}"))
            elif tags[key] != value:
                issues.append(Issue(message=f"{iid} has tag {key}={tags[key]!r}, wanted "
                                    f"{value!r}", code="tag_wrong",
                                    location=f"instance.tags.{key}"))
        return issues
