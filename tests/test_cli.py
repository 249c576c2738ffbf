"""The `cpia` command: subcommands listed without heavy imports, bad input answered without a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cpia_hf.cli import COMMANDS, main


def test_help_lists_every_subcommand_without_importing_torch() -> None:
    code = "import sys; from cpia_hf.cli import main; main(['--help'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert all(name in result.stdout for name in COMMANDS)
    probe = subprocess.run([sys.executable, "-c", "import sys, cpia_hf.cli as c; c.build_parser(); print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_missing_data_is_an_error_message(tmp_path: Path, capsys) -> None:
    status = main(["train", "--method", "mae", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run")])
    assert status == 2
    assert "absent" in capsys.readouterr().err


def test_convert_runs_numpy_blas_on_one_thread(monkeypatch, capsys) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    try:
        main(["sources", "--help"])
    except SystemExit:
        pass
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # only the conversion's processes
    try:
        main(["convert", "--help"])
    except SystemExit:
        pass
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    try:
        main(["convert", "--help"])
    except SystemExit:
        pass
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"  # an explicit setting wins
    # set before numpy starts its threads: the command module does not import numpy
    probe = subprocess.run([sys.executable, "-c", "import sys, cpia_hf.cli; print('numpy' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_train_as_a_module_answers_bad_input_in_one_line(tmp_path: Path) -> None:
    """`accelerate launch -m cpia_hf.train` runs `python -m cpia_hf.train`: the same one-line errors as `cpia train`."""
    done = subprocess.run([sys.executable, "-m", "cpia_hf.train", "--method", "mae", "--data", str(tmp_path / "absent"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("cpia train: error: ") and str(tmp_path / "absent") in done.stderr
