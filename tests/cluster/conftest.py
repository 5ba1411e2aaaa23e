"""Fixtures that stand up real cluster pieces on loopback: an S3-compatible server (moto's server mode)."""

import logging
import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """An S3 endpoint on 127.0.0.1 with a bucket ``loom``; the AWS_* variables point botocore/s3fs (and every
    process started from here: Ray workers, the CLI) at it."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    env = {"AWS_ACCESS_KEY_ID": "loom-test", "AWS_SECRET_ACCESS_KEY": "loom-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="loom")
    import s3fs

    # fsspec caches filesystem instances by their arguments: one made for an earlier test's server (another port,
    # now stopped) would be handed out again
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    finally:
        srv.stop()
