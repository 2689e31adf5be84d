"""The S3 server helper that the end-to-end tests rely on: it starts a real
server on loopback, checks credentials once auth is on, and simulates the
outages the outage tests need (a refusing gate, a frozen server) without
losing the server's state."""

import subprocess
import sys
import json
from pathlib import Path

import botocore.exceptions
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3server import REPO, Gate, S3Server, doc_policy  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.create_bucket("e2e")
        yield server


def test_objects_survive_a_gate_outage(s3):
    from botocore.config import Config
    import boto3

    with Gate(s3.port) as gate:
        c = boto3.client(
            "s3",
            endpoint_url=gate.endpoint,
            region_name="us-east-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
        )
        c.put_object(Bucket="e2e", Key="gate/1", Body=b"one")
        gate.close()
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            c.get_object(Bucket="e2e", Key="gate/1")
        gate.open()
        assert c.get_object(Bucket="e2e", Key="gate/1")["Body"].read() == b"one"


def test_frozen_server_times_out_then_recovers(s3):
    from botocore.config import Config
    import boto3

    c = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    c.put_object(Bucket="e2e", Key="freeze/1", Body=b"x")
    s3.freeze()
    try:
        with pytest.raises((botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
            c.get_object(Bucket="e2e", Key="freeze/1")
    finally:
        s3.thaw()
    assert c.get_object(Bucket="e2e", Key="freeze/1")["Body"].read() == b"x"


def test_serve_command_prints_endpoint_and_stops_when_stdin_closes():
    p = subprocess.Popen(
        [str(REPO / ".venv/bin/python"), str(REPO / "tests/e2e/s3server.py"), "serve", "--bucket", "cli"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    info = json.loads(p.stdout.readline())
    assert info["endpoint"].startswith("http://127.0.0.1:")
    p.stdin.close()
    assert p.wait(timeout=30) == 0


def test_auth_mode_checks_keys_and_policies():
    with S3Server() as s3:
        s3.create_bucket("auth")
        key, secret = s3.create_user("sidecar", doc_policy("sidecar", "auth", "vol"))
        s3.enable_auth()
        ok = s3.client(key=key, secret=secret)
        ok.put_object(Bucket="auth", Key="vol/1", Body=b"1")
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            ok.delete_object(Bucket="auth", Key="vol/1")
        with pytest.raises(botocore.exceptions.ClientError):
            s3.client(key=key, secret="wrong").get_object(Bucket="auth", Key="vol/1")
        assert s3.open_multipart_uploads("auth", key=key, secret=secret) == []
