"""Every failure at the Hub boundary is one line on stderr naming the repo and what to do, exit status 2, for
`cpia push`, `cpia export --push-to-hub` and `cpia train --push-to-hub` (checked before any training step)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
from fakehub import Fault, fake_hub  # noqa: F401  (pytest fixture)
from huggingface_hub import constants
from huggingface_hub.utils import _http
from safetensors.torch import save_file

from cpia_hf import hub
from cpia_hf.cli import main


def cpia(args: list[str]) -> int:
    """The exit status of `cpia ARGS`, run in this process."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code

REPOS = {"push": "someone/cpia", "export": "someone/cpia-model", "train": "someone/cpia-run"}
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2}


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed


@pytest.fixture
def no_waiting(monkeypatch):
    """Retries happen, without their waits: returns the list of waits asked for."""
    waits: list[float] = []
    monkeypatch.setattr(hub.time, "sleep", waits.append)
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": waits.append}))
    return waits


@pytest.fixture
def library_logs_to_stderr():
    """huggingface_hub's log handler writes to the stderr of this test (as in a real process), so that any
    warning it lets through is seen."""
    import logging

    handlers = [h for h in logging.getLogger("huggingface_hub").handlers if isinstance(h, logging.StreamHandler)]
    streams = [handler.stream for handler in handlers]
    for handler in handlers:
        handler.stream = sys.stderr  # not setStream: it would flush the old stream, closed by now
    yield
    for handler, stream in zip(handlers, streams):
        handler.stream = stream


@pytest.fixture
def training_must_not_start(monkeypatch):
    import cpia_hf.train.cli as train_cli

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the Hub check failed")

    monkeypatch.setattr(train_cli, "train", refuse)


def command_args(command: str, tmp_path, endpoint: str) -> list[str]:
    if command == "push":
        folder = tmp_path / "cpia"
        shard = folder / "data" / "full" / "M" / "open-a" / "open-a-00000.parquet"
        shard.parent.mkdir(parents=True)
        pq.write_table(pa.table({"subset": ["open-a"], "license": ["CC-BY-4.0"]}), shard)
        (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# CPIA\n")
        return ["push", "--repo", str(folder), "--repo-id", REPOS[command], "--endpoint", endpoint]
    if command == "export":
        weights = tmp_path / "encoder.safetensors"
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
        save_file(model.state_dict(), weights)
        return ["export", "--weights", str(weights), "--model", "vit_tiny_patch16_224", "--model-args",
                json.dumps(TINY_VIT), "--out", str(tmp_path / "model"), "--push-to-hub", REPOS[command],
                "--endpoint", endpoint]
    return ["train", "--method", "mae", "--data", str(tmp_path / "no-data-needed"), "--out", str(tmp_path / "run"),
            "--push-to-hub", REPOS[command], "--hub-endpoint", endpoint]


# case -> (how to break the Hub, the words the line must hold, commands it applies to)
CASES = {
    "no network": (lambda hub_, mp: None, "cannot reach the Hub", ("push", "export", "train")),
    "offline mode": (lambda hub_, mp: mp.setattr(constants, "HF_HUB_OFFLINE", True), "HF_HUB_OFFLINE is set",
                     ("push", "export", "train")),
    "401 bad token": (lambda hub_, mp: mp.setenv("HF_TOKEN", "hf_not_the_right_one"), "token was refused",
                      ("push", "export", "train")),
    "403 read-only token": (lambda hub_, mp: setattr(hub_, "role", "read"), "write access",
                            ("push", "export", "train")),
    "403 at commit": (lambda hub_, mp: hub_.faults.append(Fault(r"/commit/", 403)), "may not write there",
                      ("push", "export")),
    "404 namespace": (lambda hub_, mp: hub_.faults.append(Fault(r"^POST /api/repos/create", 404)), "not found",
                      ("push", "export", "train")),
    "409 at commit": (lambda hub_, mp: hub_.faults.append(Fault(r"/commit/", 409)), "conflict", ("push", "export")),
    "429 at preupload": (lambda hub_, mp: hub_.faults.append(Fault(r"/preupload/", 429)), "rate-limited",
                         ("push", "export")),
    "429 at whoami": (lambda hub_, mp: hub_.faults.append(Fault(r"whoami", 429)), "rate-limited",
                      ("push", "export", "train")),
    "503 at commit": (lambda hub_, mp: hub_.faults.append(Fault(r"/commit/", 503)), "HTTP 503", ("push", "export")),
    "502 at create": (lambda hub_, mp: hub_.faults.append(Fault(r"^POST /api/repos/create", 502)), "HTTP 502",
                      ("push", "export", "train")),
}
PARAMS = [pytest.param(case, command, id=f"{command}-{case}") for case, (_, _, commands) in CASES.items()
          for command in commands]


@pytest.mark.parametrize(("case", "command"), PARAMS)
def test_hub_errors_are_one_line_naming_the_repo(case, command, fake_hub, tmp_path, monkeypatch, capfd, no_waiting,
                                                 training_must_not_start, library_logs_to_stderr):
    breaks, words, _ = CASES[case]
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    endpoint = closed_port_url() if case == "no network" else fake_hub.url
    args = command_args(command, tmp_path, endpoint)
    capfd.readouterr()
    breaks(fake_hub, monkeypatch)

    assert cpia(args) == 2

    # export's own progress bar (transformers' "Writing model shards", drawn with \r) is not a Hub message
    lines = [line for line in capfd.readouterr().err.split("\n") if line and not line.startswith("\r")]
    assert len(lines) == 1 and lines[0].startswith(f"cpia {command}: error: "), lines
    err = lines[0]
    assert REPOS[command] in err and words in err, err
    assert fake_hub.token not in err
    if case.startswith(("429", "503", "502")):  # given up only after retries
        assert sum(case.split()[-1] in path for _, path, _ in fake_hub.requests) > 1 and no_waiting
    if command == "train":
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*"))


def test_train_with_a_bad_token_fails_in_seconds_before_any_step(fake_hub, tmp_path, monkeypatch, capfd,
                                                                training_must_not_start):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    args = command_args("train", tmp_path, fake_hub.url)
    import cpia_hf.train.cli  # noqa: F401  (imported up front: the timing is the check's, not torch's import)

    started = time.perf_counter()
    assert cpia(args) == 2
    assert time.perf_counter() - started < 3
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and REPOS["train"] in err and "HF_TOKEN" in err
    assert [path for _, path, _ in fake_hub.requests] == ["/api/whoami-v2"]


def test_cpia_push_as_a_process_in_offline_mode_prints_one_line(tmp_path):
    args = command_args("push", tmp_path, closed_port_url())
    env = {**os.environ, "HF_TOKEN": "hf_some_token", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cpia_hf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "someone/cpia" in done.stderr and "HF_HUB_OFFLINE" in done.stderr


def test_train_whose_final_push_fails_says_so_in_one_line_and_keeps_the_model(fake_hub, demo_build, tmp_path,
                                                                              monkeypatch, capfd, no_waiting):
    from cpia_hf.demo.demo import DEMO_TRAIN_ARGS

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    fake_hub.faults.append(Fault(r"/commit/", 503))  # the access check passes; the Hub fails at the end
    out = tmp_path / "run"
    status = cpia(["train", *DEMO_TRAIN_ARGS, "--no-progress", "--data", str(demo_build / "dataset"), "--out", str(out),
                   "--push-to-hub", REPOS["train"], "--hub-endpoint", fake_hub.url])
    assert status == 2
    lines = [line for line in capfd.readouterr().err.split("\n") if line and not line.startswith("\r")]
    assert len(lines) == 1 and lines[0].startswith("cpia train: error: ") and REPOS["train"] in lines[0], lines
    assert "HTTP 503" in lines[0]
    assert (out / "model" / "model.safetensors").is_file()  # the trained model is kept for a later push
