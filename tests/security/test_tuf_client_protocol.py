"""`edgewise agent tuf-client`: the device's TUF client behind the tuf-conformance client
protocol, against the real server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from edgewise.artifacts import file_sha256
from edgewise.sim import edgewise_command
from tests.conftest import make_tiny_bundle


def client(*args: str, ca: Path) -> subprocess.CompletedProcess:
    return subprocess.run(edgewise_command("agent", "tuf-client", *args), capture_output=True,
                          text=True, timeout=60, env={**os.environ, "EDGEWISE_CA": str(ca)})


def test_init_refresh_download_and_refuse_tampering(live_server, tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    live_server.publish(bundle, assign=False)
    meta, targets = tmp_path / "meta", tmp_path / "targets"
    common = ["--metadata-dir", str(meta), "--metadata-url", f"{live_server.url}/tuf/metadata/"]
    assert client("--metadata-dir", str(meta), "init", str(live_server.keys.root_json),
                  ca=live_server.ca).returncode == 0
    assert client(*common, "refresh", ca=live_server.ca).returncode == 0
    download = [*common, "--target-name", "tiny/1.0.0/model.onnx", "--target-base-url",
                f"{live_server.url}/tuf/targets/", "--target-dir", str(targets), "download"]
    result = client(*download, ca=live_server.ca)
    assert result.returncode == 0, result.stderr
    (got,) = targets.iterdir()
    assert file_sha256(got) == file_sha256(bundle / "model.onnx")

    # Not a signed target: exit 1.
    bad = [a if a != "tiny/1.0.0/model.onnx" else "tiny/1.0.0/evil.onnx" for a in download]
    assert client(*bad, ca=live_server.ca).returncode == 1
    # Tampered bytes on the server: exit 1, nothing new in the target dir.
    got.unlink()
    sha, _ = file_sha256(bundle / "model.onnx")
    obj = live_server.data_dir / "tuf" / "objects" / sha
    obj.write_bytes(obj.read_bytes()[:-4] + b"evil")
    result = client(*download, ca=live_server.ca)
    assert result.returncode == 1 and "tuf-client" in result.stderr
    assert list(targets.iterdir()) == []
