import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write_folder_dataset
from fastsort import bench_loader as bl
from fastsort.index import DataError
from fastsort.loader import epoch_rng, sample_seed_chain


def test_seed_loader_and_fastsort_apply_ops_at_the_same_rates():
    """The albumentations chain the seed loader runs, counted op by op, against fastsort's sampler."""
    A = pytest.importorskip("albumentations")
    chain = bl.seed_albumentations(16, normalize=False)
    chain = A.Compose(chain.transforms, save_applied_params=True)
    img = np.zeros((16, 16, 3), np.uint8)
    n = 6000
    seen = Counter()
    for _ in range(n):
        names = [t for t, _ in chain(image=img)["applied_transforms"]]
        flips = {"VerticalFlip", "HorizontalFlip"} & set(names)
        seen["flip:" + ("both" if len(flips) == 2 else next(iter(flips), "none"))] += 1
        for group, members in (("colour", ("RandomBrightnessContrast", "RandomGamma", "HueSaturationValue")),
                               ("blur", ("GaussianBlur", "Blur", "MedianBlur")),
                               ("geo", ("RandomResizedCrop", "Affine"))):
            hit = [m for m in members if m in names]
            seen[f"{group}:{hit[0] if hit else 'none'}"] += 1
    ours = sample_seed_chain(epoch_rng(1, 1), 200_000, 16)
    rate = lambda key, v: float(np.mean(ours[key] == v))  # noqa: E731
    expected = {"flip:none": rate("flip", 0), "flip:VerticalFlip": rate("flip", 1), "flip:HorizontalFlip": rate("flip", 2),
                "flip:both": rate("flip", 3), "colour:none": rate("colour", 0),
                "colour:RandomBrightnessContrast": rate("colour", 1), "colour:RandomGamma": rate("colour", 2),
                "colour:HueSaturationValue": rate("colour", 3), "blur:none": rate("blur", 0),
                "blur:GaussianBlur": rate("blur", 1), "blur:Blur": rate("blur", 2), "blur:MedianBlur": rate("blur", 3),
                "geo:none": rate("geo", 0), "geo:RandomResizedCrop": rate("geo", 1), "geo:Affine": rate("geo", 2)}
    for key, p in expected.items():
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(seen[key] / n - p) < 5 * sd + 1e-3, (key, seen[key] / n, p)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("bench") / "set", per_class=8)


def test_bench_loader_runs_variants_side_by_side(tiny):
    pytest.importorskip("albumentations")
    rows = bl.bench_loader(str(tiny), variants=["fastsort", "seed", "decode-cv2", "decode-dali"], batch=8, size=32,
                           cpus=1, epochs=1, timeout=300)
    by = {r["variant"]: r for r in rows}
    for name in ("fastsort", "seed", "decode-cv2"):
        r = by[name]
        assert "skipped" not in r, r
        assert r["images_per_epoch"] == 24 and r["img_per_s"] > 0 and r["cpu_ms_per_img"] > 0
        assert r["peak_rss_mib"] > 10
    assert "skipped" not in by["decode-dali"] or "nvidia.dali" in by["decode-dali"]["skipped"]
    results = {"machine": {"date": "2026-01-01", "host_cpus": 2, "device": "cpu", "git_commit": "x"},
               "command": "fastsort bench loader", "params": {"data": str(tiny), "batch": 8, "size": 32, "cpus": 1,
                                                             "epochs": 1}, "images": 24, "rows": rows,
               "mix": {"ms_per_batch": 1.0, "img_per_s": 8000.0}}
    md = bl.loader_markdown(results)
    assert "| fastsort |" in md and "× seed loader" in md and "CutMix/GridMask" in md


def test_a_missing_library_skips_only_its_variant(tiny, monkeypatch):
    monkeypatch.setitem(bl.NEEDS, "seed", ("no_such_module_xyz", "pip install no-such"))
    rows = bl.bench_loader(str(tiny), variants=["seed", "decode-cv2"], batch=8, size=32, cpus=1, epochs=1)
    assert rows[0] == {"variant": "seed", "skipped": "no_such_module_xyz is not installed (pip install no-such)"}
    assert rows[1]["img_per_s"] > 0


def test_bad_benchmark_inputs(tmp_path, tiny):
    with pytest.raises(DataError, match="benchmark data not found.*make_bench_data"):
        bl.check_inputs(str(tmp_path / "nope"), 1)
    with pytest.raises(DataError, match="--cpus 999"):
        bl.check_inputs(str(tiny), 999)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError):
        bl.check_inputs(str(tmp_path / "empty"), 1)


def test_bench_loader_cli_quick_writes_json_and_chart(tiny, tmp_path):
    from typer.testing import CliRunner

    from fastsort.cli import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "loader", str(tiny), "--variants", "fastsort,decode-cv2", "--batch", "8",
                                      "--size", "32", "--cpus", "1", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["fastsort", "decode-cv2"] and data["params"]["quick"]
    assert out.with_suffix(".png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["bench", "loader", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "not found" in bad.output
