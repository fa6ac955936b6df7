"""The EC2 verifier against moto's EC2 API on 127.0.0.1, through real boto3 calls."""

from __future__ import annotations

from typing import Any

import pytest

import closedloop as cl
from closedloop.verify import Ec2InstanceVerifier, Eventually, InstanceExpectation


@pytest.fixture(scope="module")
def network(moto_endpoint: str) -> dict[str, str]:
    """A VPC, subnet, two security groups and an image, made once (moto is slow to list)."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    web = ec2.create_security_group(GroupName=f"web-{vpc}", Description="w", VpcId=vpc)["GroupId"]
    ssh = ec2.create_security_group(GroupName=f"ssh-{vpc}", Description="s", VpcId=vpc)["GroupId"]
    image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
    return {"vpc": vpc, "subnet": subnet, "web": web, "ssh": ssh, "image": image}


@pytest.fixture
def instance(ec2: Any, network: dict[str, str]) -> dict[str, Any]:
    created = ec2.run_instances(
        ImageId=network["image"], MinCount=1, MaxCount=1, InstanceType="t3.micro",
        SubnetId=network["subnet"], SecurityGroupIds=[network["web"], network["ssh"]],
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "Owner", "Value": "platform"},
                                     {"Key": "Env", "Value": "prod"}]}],
    )["Instances"][0]
    return {"id": created["InstanceId"], **network}


def unreachable_client() -> Any:
    """A real boto3 client pointed at a closed local port, failing fast."""
    import boto3
    from botocore.config import Config

    return boto3.client("ec2", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=1))


def expectation(inst: dict[str, Any], **changes: Any) -> InstanceExpectation:
    fields: dict[str, Any] = {
        "instance_id": inst["id"], "instance_type": "t3.micro",
        "security_groups": {inst["web"], inst["ssh"]}, "tags": {"Owner": "platform", "Env": None},
        "state": "running", "subnet_id": inst["subnet"], "vpc_id": inst["vpc"],
    }
    fields.update(changes)
    return InstanceExpectation(**fields)


def test_matching_instance_passes(ec2: Any, instance: dict[str, Any]) -> None:
    verdict = Ec2InstanceVerifier(client=ec2).check([expectation(instance)])
    assert verdict.passed, verdict


def test_security_groups_match_by_name_too(ec2: Any, instance: dict[str, Any]) -> None:
    names = {f"web-{instance['vpc']}", f"ssh-{instance['vpc']}"}
    verdict = Ec2InstanceVerifier(client=ec2).check([expectation(instance,
                                                                 security_groups=names)])
    assert verdict.passed, verdict


def test_every_mismatch_is_reported_at_once(ec2: Any, instance: dict[str, Any]) -> None:
    wrong = expectation(instance, instance_type="m5.large", security_groups={instance["web"]},
                        tags={"Owner": "data", "CostCenter": None}, state="stopped",
                        subnet_id="subnet-0000", vpc_id="vpc-0000")
    verdict = Ec2InstanceVerifier(client=ec2).check([wrong])
    assert sorted(i.code for i in verdict.issues) == [
        "ec2_instance_type", "ec2_security_groups", "ec2_state", "ec2_subnet_id",
        "ec2_tag", "ec2_tag_missing", "ec2_vpc_id"]
    assert all(i.location == instance["id"] for i in verdict.issues)


def test_security_groups_are_compared_as_sets(ec2: Any, instance: dict[str, Any]) -> None:
    wanted = {instance["web"], "sg-missing"}
    (issue,) = Ec2InstanceVerifier(client=ec2).check(
        [expectation(instance, security_groups=wanted)]).issues
    assert issue.code == "ec2_security_groups"
    assert "missing sg-missing" in issue.message
    assert f"unexpected {instance['ssh']}" in issue.message


def test_several_instances_are_read_and_all_mismatches_reported(
    ec2: Any, instance: dict[str, Any]
) -> None:
    verdict = Ec2InstanceVerifier(client=ec2).check([
        expectation(instance, instance_type="t3.large"),
        InstanceExpectation(instance_id="i-00000000000000000"),
    ])
    assert sorted((i.code, i.location) for i in verdict.issues) == [
        ("ec2_instance_type", instance["id"]), ("ec2_not_found", "i-00000000000000000")]


def test_stopped_instance_fails_the_running_check(ec2: Any, instance: dict[str, Any]) -> None:
    ec2.stop_instances(InstanceIds=[instance["id"]])
    (issue,) = Ec2InstanceVerifier(client=ec2).check([expectation(instance)]).issues
    assert issue.code == "ec2_state"


def test_unreachable_endpoint_is_unknown() -> None:
    verifier = Ec2InstanceVerifier(client=unreachable_client())
    verdict = verifier.check([InstanceExpectation(instance_id="i-1")])
    assert not verdict.passed
    assert verdict.unknown is not None
    assert verdict.unknown.startswith("cannot read EC2")


def test_in_the_loop_a_wrong_instance_fails_verification(
    ec2: Any, instance: dict[str, Any], memory_store: cl.Store
) -> None:
    def launch(proposal: str) -> str:
        return str(instance["id"])

    verifier = Ec2InstanceVerifier(lambda intent, iid: expectation(instance, instance_type=intent),
                                   client=ec2)
    loop = cl.Loop(lambda t, a: "plan", task_type="ec2", executor=launch,
                   verifiers=[verifier], store=memory_store)
    assert loop.run("t3.micro").outcome is cl.Outcome.SUCCEEDED
    wrong = loop.run("m5.large")
    assert (wrong.outcome, wrong.error_type) == (cl.Outcome.FAILED, cl.ErrorType.VERIFICATION)
    assert wrong.verification[0].check == "ec2_instance"


def test_unreachable_ec2_in_the_loop_is_verification_unknown(memory_store: cl.Store) -> None:
    verifier = Ec2InstanceVerifier(lambda i, r: InstanceExpectation(instance_id="i-1"),
                                   client=unreachable_client())
    loop = cl.Loop(lambda t, a: "p", task_type="ec2", executor=lambda p: None,
                   verifiers=[verifier], store=memory_store)
    result = loop.run("x")
    assert result.error_type is cl.ErrorType.VERIFICATION_UNKNOWN


def test_eventually_waits_for_a_pending_instance_to_run(
    ec2: Any, instance: dict[str, Any]
) -> None:
    ec2.stop_instances(InstanceIds=[instance["id"]])
    now = [0.0]

    def sleep(seconds: float) -> None:  # the cloud catches up while we wait
        now[0] += seconds
        ec2.start_instances(InstanceIds=[instance["id"]])

    check = Eventually(Ec2InstanceVerifier(client=ec2), timeout=30, interval=1,
                       clock=lambda: now[0], sleep=sleep)
    verdict = check(None, expectation(instance))
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["converged"]


def test_a_result_that_is_not_an_expectation_is_a_wiring_error(ec2: Any) -> None:
    with pytest.raises(TypeError, match="must return an InstanceExpectation"):
        Ec2InstanceVerifier(client=ec2)(None, "i-123")
