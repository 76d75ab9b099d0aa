import json

import pytest
import torch
from typer.testing import CliRunner

from fastsort import bench
from fastsort.cli import app


def test_time_median_synchronises_before_reading_the_clock(monkeypatch):
    events = []
    monkeypatch.setattr(bench, "sync", lambda device: events.append("sync"))
    clock = iter(range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    t = bench.time_median(lambda: events.append("run"), torch.device("cpu"), warmup=2, iters=3)
    # warm-up runs, a sync, then every timed run is followed by a sync before the clock is read
    assert events == ["run", "run", "sync"] + ["run", "sync"] * 3
    assert t["median_s"] == 1.0 and t["iters"] == 3


def test_mish_op_benchmark_on_cpu_and_markdown():
    op = bench.bench_mish_op(numel=4096, dtype=torch.float32, device=torch.device("cpu"), iters=2)
    rows = {r["variant"]: r for r in op["rows"]}
    assert set(rows) == {"native", "naive", "compile", "fused"}
    assert rows["native"]["gb_per_s"] > 0 and rows["native"]["median_s"] > 0
    assert "skipped" in rows["fused"]  # no CUDA: the interpreter is not a speed path
    results = {"machine": bench.machine_info(torch.device("cpu")), "command": "fastsort bench mish", "op": [op],
               "models": [{"model": "m", "mish": "fused", "skipped": "no GPU"}]}
    md = bench.mish_markdown(results)
    assert "| native |" in md and "skipped: no GPU" in md and "4,096 float32" in md


def test_readme_section_is_regenerated_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- t:start -->\nold\n<!-- t:end -->\nbottom\n")
    bench.update_readme_section(readme, "t", "new table\n")
    assert readme.read_text() == "top\n<!-- t:start -->\nnew table\n<!-- t:end -->\nbottom\n"
    with pytest.raises(ValueError, match="no <!-- u:start -->"):
        bench.update_readme_section(readme, "u", "x")


def test_bench_mish_cli_writes_results(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "mish", "--models", "none", "--numel", "2048", "--iters", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["params"]["numel"] == 2048 and data["machine"]["torch"] == torch.__version__
    assert "| variant |" in result.output
    bad = CliRunner().invoke(app, ["bench", "mish", "--dtypes", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output


def test_bench_step_reports_synthetic_and_real_rates(tmp_path):
    from conftest import write_folder_dataset

    data = write_folder_dataset(tmp_path / "d", per_class=4)
    rows = bench.bench_step(str(data), model="resnet18", batch=4, size=32, device=torch.device("cpu"),
                            loader="threads", precisions=["fp32"], channels_last=[True, False], steps=1, warmup=1)
    assert [r["channels_last"] for r in rows] == [True, False]
    for r in rows:
        assert r["synthetic_img_per_s"] > 0 and r["real_img_per_s"] > 0 and 0 <= r["loader_bound"] <= 1
        assert r["loader"] == "threads" and (r["batch"], r["size"]) == (4, 32)
    md = bench.step_markdown({"machine": bench.machine_info(torch.device("cpu")), "command": "fastsort bench step",
                              "rows": rows})
    assert md.count("| resnet18 | fp32 |") == 2
    with pytest.raises(ValueError, match="needs batch x"):
        bench.bench_step(str(data), model="resnet18", batch=8, size=32, device=torch.device("cpu"),
                         precisions=["fp32"], channels_last=[True], steps=5)


def test_bench_step_cli_rejects_bad_options(tmp_path):
    bad = CliRunner().invoke(app, ["bench", "step", str(tmp_path), "--precisions", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output
    bad = CliRunner().invoke(app, ["bench", "step", str(tmp_path), "--layouts", "nhwc"])
    assert bad.exit_code == 2 and "--layouts" in bad.output
