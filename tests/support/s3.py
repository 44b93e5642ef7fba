"""A real S3 endpoint for tests: ``moto_server`` on a free loopback port, one bucket per test.

``s3_server`` (session) starts the server and stops it at the end, whatever happens;
``s3_bucket`` (function) creates a fresh bucket through boto3 and hands out the fsspec
``storage_options`` that reach it. Credentials are dummies; the AWS_* variables are set only
while the server fixture is active, so boto never looks for real ones (or for EC2 metadata).

Use it from a test module with ``from tests.support.s3 import s3_bucket, s3_server`` (pytest
finds fixtures imported into the module namespace).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.ports import free_port

__all__ = ["S3Bucket", "S3Server", "s3_bucket", "s3_server"]

_START_TIMEOUT_SECONDS = 30.0
_KEY = "testing"
_SECRET = "testing"
_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    process: subprocess.Popen[bytes] = field(repr=False)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments that reach this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": _KEY,
            "secret": _SECRET,
            "client_kwargs": {"region_name": _REGION},
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_KEY,
            aws_secret_access_key=_SECRET,
            region_name=_REGION,
        )


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options()


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on {url} within {_START_TIMEOUT_SECONDS}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    binary = shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server not found; install the test extras (moto[server])")
    env = {
        "AWS_ACCESS_KEY_ID": _KEY,
        "AWS_SECRET_ACCESS_KEY": _SECRET,
        "AWS_DEFAULT_REGION": _REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        try:
            _wait_ready(proc, url)
            yield S3Server(endpoint_url=url, process=proc)
        finally:
            _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return S3Bucket(server=s3_server, name=name)
