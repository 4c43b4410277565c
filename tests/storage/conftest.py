"""Fixtures of the storage tests: backends over the real S3 servers of ``tests/s3servers.py``.

Each server gets one bucket per session and each test a key prefix of its
own, which is cheaper than a bucket per test and exercises the prefix too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from nixeryd.builtin.s3 import S3Storage
from tests.s3servers import S3Server

#: Small enough to exercise multipart uploads with a few MiB; S3 and RGW refuse
#: parts under 5 MiB but the last.
PART_SIZE = 5 * 1024 * 1024

StorageFactory = Callable[..., S3Storage]


@pytest.fixture(scope="session", params=["seaweedfs", "ceph_rgw"])
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    server: S3Server = request.getfixturevalue(request.param)
    return server


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def make_s3_storage(s3_server: S3Server, s3_bucket: str) -> StorageFactory:
    """Makes (unstarted) backends on the session's bucket, under this test's own prefix."""
    prefix = f"test-{uuid.uuid4().hex[:12]}/"

    def make(**options: Any) -> S3Storage:
        settings: dict[str, Any] = {
            "bucket": s3_bucket,
            "http": treq,
            "reactor": reactor,
            "run_in_thread": deferToThread,
            "endpoint": s3_server.endpoint,
            "region": s3_server.region,
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "path_style": True,
            "prefix": prefix,
            "multipart_threshold": PART_SIZE,
            "part_size": PART_SIZE,
            "retry_delay": 0.05,
        }
        return S3Storage(**{**settings, **options})

    return make
