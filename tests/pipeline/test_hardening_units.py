"""Units of the hardening: weights-only checkpoint loading, seals, secret handling, error classification."""
import json
import os

import pytest
import torch

from pipeline.train.checkpoints import local_copy, safe_load, seal, verify
from pipeline.common.errors import CheckpointError, DataError, NonFiniteLoss, repeating_error
from pipeline.common.runtime import forwarded_env
from pipeline.common.tracking import credentials_to_env, redact


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_safe_load_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a plain weights file"):
        safe_load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(safe_load(str(tmp_path / "ok.pt"))["w"], torch.ones(2))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cut.pt cannot be read"):
        safe_load(str(tmp_path / "cut.pt"))


def test_seals_detect_truncated_emptied_missing_and_absent_ranks(tmp_path):
    d = tmp_path / "ck"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "model.pt").write_bytes(b"x" * 100)
    (d / "train_state.json").write_text(json.dumps({"step": 4}))
    seal(str(d), 0, 2, own=["ds/model.pt", "train_state.json"])
    assert verify(str(d)) == ["1 of 2 ranks' seals present"]
    (d / "rng_rank1.pt").write_bytes(b"r")
    seal(str(d), 1, 2, own=["rng_rank1.pt"])
    assert verify(str(d)) == []
    (d / "train_state.json").write_text("")
    (d / "ds" / "model.pt").write_bytes(b"y" * 100)
    (d / "rng_rank1.pt").unlink()
    assert verify(str(d)) == ["ds/model.pt does not match its sha256", "train_state.json has 0 bytes, 11 were written",
                              "rng_rank1.pt is missing"]
    # sizes only (the driver's check before Ray starts): the same-size rewrite passes, the rest does not
    assert verify(str(d), hashes=False) == ["train_state.json has 0 bytes, 11 were written", "rng_rank1.pt is missing"]
    assert verify(str(tmp_path)) is None  # no seals at all: an older checkpoint, unverifiable


def test_each_reader_of_a_remote_checkpoint_has_its_own_copy(tmp_path):
    """Two ranks on one node restoring the same remote checkpoint: one leaving (and its copy going) never touches
    the copy the other still reads. Ray's shared as_directory download gave both the same directory."""
    import fsspec
    import pyarrow.fs
    from ray.train import Checkpoint
    mem = fsspec.filesystem("memory")
    mem.pipe("/ckpt/train_state.json", b'{"step": 20}')
    ckpt = Checkpoint("/ckpt", filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(mem)))
    with local_copy(ckpt) as a:
        with local_copy(ckpt) as b:
            assert a != b
        assert not os.path.exists(b)
        assert json.loads(open(os.path.join(a, "train_state.json")).read()) == {"step": 20}
    assert not os.path.exists(a)
    local = Checkpoint.from_directory(str(tmp_path))
    with local_copy(local) as d:  # a local checkpoint is read in place, never copied or removed
        assert d == str(tmp_path)
    assert tmp_path.exists()


def test_credentials_leave_the_uri_and_never_reach_logs(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setattr("sys.argv", ["train_ldm.py", "--mlflow-uri", "http://bob:s3cr%40t@mlflow.example:5000"])
    assert redact("http://bob:pw@host:5000/x") == "http://***@host:5000/x"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert credentials_to_env("http://bob:s3cr%40t@mlflow.example:5000") == "http://mlflow.example:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"
    assert "s3cr" not in " ".join(__import__("sys").argv)


def test_secrets_are_never_forwarded_to_a_cluster(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] and env["MLFLOW_TRACKING_URI"]
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                "MLFLOW_TRACKING_PASSWORD"} & set(env)


def test_user_errors_are_told_apart_from_failures_that_may_pass():
    class Wrapped(Exception):  # like Ray Train's UserExceptionWithTraceback
        def __init__(self, base):
            self._base_exc = base

    class GroupError(Exception):
        def __init__(self, failures):
            self.worker_failures = failures

    bad_ckpt = CheckpointError("x is corrupt")
    assert repeating_error(GroupError({1: Wrapped(RuntimeError("gloo")), 0: Wrapped(bad_ckpt)})) is bad_ckpt
    assert isinstance(repeating_error(GroupError({0: Wrapped(DataError("no batch"))})), DataError)
    assert isinstance(repeating_error(GroupError({0: Wrapped(NonFiniteLoss("nan"))})), NonFiniteLoss)
    assert repeating_error(GroupError({0: Wrapped(RuntimeError("worker died"))})) is None
