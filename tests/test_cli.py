import csv
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import write_csv_dataset
from fastsort.cli import app

runner = CliRunner()


def test_import_fastsort_does_not_import_dali_or_triton():
    code = ("import sys, fastsort; bad = [m for m in sys.modules if m.startswith(('nvidia.dali', 'triton'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "check", "data"):
        assert cmd in result.output


def test_check_reports_every_problem_by_line(tmp_path):
    csv_path = write_csv_dataset(tmp_path, n=9)
    (tmp_path / "images" / "img004.jpg").write_bytes(b"not a jpeg")
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerows([("ghost", 1), ("img000", "")])
    result = runner.invoke(app, ["check", str(csv_path)])
    assert result.exit_code == 2
    out = result.output
    assert "no image file for id 'ghost'" in out and "line 11" in out
    assert "empty label for id 'img000'" in out
    assert "img004.jpg" in out and "cannot decode" in out


def test_check_ok_and_missing_columns(tmp_path):
    csv_path = write_csv_dataset(tmp_path, n=6)
    ok = runner.invoke(app, ["check", str(csv_path)])
    assert ok.exit_code == 0 and "6 images, 3 classes" in ok.output
    bad = runner.invoke(app, ["check", str(csv_path), "--label-col", "category"])
    assert bad.exit_code == 2 and "missing column(s) 'category'" in bad.output


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "64"], "larger than the"),
    (["--device", "cuda"], "no usable CUDA device"),
    (["--fold", "7"], "--fold must be in 0..4"),
    (["--precision", "fp8"], "--precision must be"),
    (["--pretrained", "missing.pth"], "no such file missing.pth"),
    (["--cutmix-fraction", "2"], "--cutmix-fraction must be in [0, 1], got 2.0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be a number >= 0, got -1.0"),
    (["--workers", "-1"], "--workers must be 0 (automatic) or more, got -1"),
])
def test_train_bad_options_fail_before_work(tmp_path, extra, message):
    pytest.importorskip("nvidia.dali")
    if "cuda" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    data = write_csv_dataset(tmp_path, n=20)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--model", "test_efficientnet",
                                 "--pretrained", "none", "--image-size", "32", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / "last.pt").exists()
    if "--device" not in extra and "--pretrained" not in extra:
        assert not out.exists(), "options are checked before the run folder is made"


def test_train_skip_bad_says_how_many(tmp_path):
    pytest.importorskip("nvidia.dali")
    data = write_csv_dataset(tmp_path, n=21)
    (tmp_path / "images" / "img003.png").write_bytes(b"\x89PNG broken")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "test_efficientnet",
            "--pretrained", "none", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
            "--limit-batches", "1", "--workers", "1", "--quiet"]
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 2 and "img003.png" in stopped.output and "--skip-bad" in stopped.output
    result = runner.invoke(app, args + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 image(s)" in result.output
    assert "validation accuracy (best epoch):" in result.output


def test_default_dataset_missing_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--dali"])
    assert result.exit_code == 2 and "fastsort data elpv" in result.output
