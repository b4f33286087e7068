import socket
from pathlib import Path

import pytest
from factory import write_fake_phase4c  # tests/ is on sys.path: pyproject's [tool.pytest.ini_options] pythonpath


@pytest.fixture(scope="session")
def fake_phase4c(tmp_path_factory):
    """A small Phase 4c-contract dataset: 256 train, 128 val, 128 test rows, half positives."""
    root = tmp_path_factory.mktemp("phase4c")
    return write_fake_phase4c(root, {"train": 256, "val": 128, "test": 128})


class MotoS3:
    """A local moto S3 server (a real S3 stand-in, no network) with one bucket, ``dhs``."""

    def __init__(self, client, port: int):
        self.client, self.port = client, port

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Upload every file under ``local`` (``_SUCCESS`` and hidden files too) -> its s3:// URI."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), "dhs", f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://dhs/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"


@pytest.fixture
def moto_s3(monkeypatch):
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
        yield MotoS3(s3, port)
    finally:
        server.stop()


@pytest.fixture
def s3_phase4c(fake_phase4c, moto_s3):
    """``fake_phase4c`` uploaded to a local moto S3 server: its s3:// URI."""
    return moto_s3.upload_dir(fake_phase4c, "phase4c")
