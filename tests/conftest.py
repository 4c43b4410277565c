"""Shared test set-up."""

# The real S3 servers (SeaweedFS, Ceph RGW), started on first use, once per session.
pytest_plugins = ["tests.s3servers"]
