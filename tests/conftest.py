import socket

import pytest
from factory import write_fake_phase4c  # tests/ is on sys.path: pyproject's [tool.pytest.ini_options] pythonpath


@pytest.fixture(scope="session")
def fake_phase4c(tmp_path_factory):
    """A small Phase 4c-contract dataset: 256 train, 128 val, 128 test rows, half positives."""
    root = tmp_path_factory.mktemp("phase4c")
    return write_fake_phase4c(root, {"train": 256, "val": 128, "test": 128})


@pytest.fixture
def s3_phase4c(fake_phase4c, monkeypatch):
    """``fake_phase4c`` uploaded to a local moto S3 server (a real S3 stand-in, no network): its s3:// URI."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="dhs")
        for path in fake_phase4c.rglob("*.parquet"):
            s3.upload_file(str(path), "dhs", f"phase4c/{path.relative_to(fake_phase4c).as_posix()}")
        yield f"s3://dhs/phase4c?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()
