"""Tests of the benchmark (src/vit_repro/bench.py): FLOP counts, every section on a small model, targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from vit_repro import bench
from vit_repro.cli import main
from vit_repro.model import forward_macs, parse_model_name


@pytest.mark.parametrize(
    ("name", "size", "weights"),
    [("B/16", 224, tvm.ViT_B_16_Weights.IMAGENET1K_V1), ("B/32", 224, tvm.ViT_B_32_Weights.IMAGENET1K_V1),
     ("L/16", 224, tvm.ViT_L_16_Weights.IMAGENET1K_V1), ("H/14", 518, tvm.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1)],
)
def test_forward_macs_match_torchvisions_published_counts(name: str, size: int, weights) -> None:
    macs = forward_macs(parse_model_name(name, image_size=size, num_classes=1000))
    assert macs / 1e9 == pytest.approx(weights.meta["_ops"], abs=1e-3)  # torchvision publishes GMACs, 3 decimals


def test_forward_macs_count_the_pre_logits_layer() -> None:
    plain = forward_macs(parse_model_name("Ti/16", num_classes=3))
    assert forward_macs(parse_model_name("Ti/16", num_classes=3, representation_size=100)) == plain - 192 * 3 + 192 * 100 + 100 * 3


def test_build_model_gives_the_same_architecture_from_each_library() -> None:
    cfg = parse_model_name("Ti/16", image_size=32, num_classes=3)
    counts = {kind: sum(p.numel() for p in m.parameters()) for kind in bench.MODELS
              if (m := bench.build_model(kind, cfg)) is not None}
    assert {"vit_repro", "torchvision"} <= set(counts)
    assert len(set(counts.values())) == 1, counts
    assert bench.build_model("vit_repro", cfg, attention="matmul").blocks[0].attn.attention == "matmul"
    with pytest.raises(ValueError, match="unknown model kind"):
        bench.build_model("jax", cfg)


def test_unknown_section_and_missing_data_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown section"):
        bench.run_benchmark(bench.BenchConfig(device=torch.device("cpu"), sections=("speed",)))
    with pytest.raises(FileNotFoundError, match="run `dvc repro prepare` first"):
        bench.run_benchmark(bench.BenchConfig(device=torch.device("cpu"), sections=("data",), prepared=tmp_path))


def test_targets_are_judged_from_the_numbers() -> None:
    rows = [{"model": m, "precision": p, "img_per_s": r, "gflops": 0.0, "fraction_of_ceiling": f}
            for m, p, r, f in [("vit_repro", "fp32", 1.2, 0.5), ("torchvision", "fp32", 1.0, 0.4),
                               ("vit_repro", "bf16", 3.0, 0.9), ("torchvision", "bf16", 2.8, 0.8)]]
    result = {"settings": {"model": "B/16"}, "train": rows,
              "frozen": {"grid_vs_feature_pass": 2.0, "grid_s": 20, "runs": 24, "feature_pass_s": 10,
                         "speedup_vs_seed": 30, "cached_total_s": 30, "seed_approach_s_extrapolated": 900},
              "data": {"images": 120, "cache_read_s": 0.5, "cached_epoch_s": 0.5}, "dvc_noop": {"seconds": 3, "stages": 5}}
    met = {t["target"]: t["met"] for t in bench.evaluate_targets(result)}
    assert met == {
        "train_fp32_vs_torchvision": True,  # 1.2x
        "train_bf16_vs_torchvision": False,  # 1.07x
        "train_bf16_fraction_of_ceiling": True,  # 90 %
        "frozen_grid_vs_one_feature_pass": False,  # 2x
        "frozen_speedup_vs_seed_approach": True,  # 30x
        "cached_loader_fraction_of_scratch_epoch": True,  # 1 s of a 100 s epoch
        "dvc_repro_noop_seconds": True,
    }


@pytest.mark.slow
def test_every_section_on_a_small_model(prepared_dir: Path, tmp_path: Path) -> None:
    bc = bench.BenchConfig(
        device=torch.device("cpu"), sections=("ceilings", "train", "inference", "frozen", "data"), model="Ti/16",
        batch_size=2, image_size=32, warmup=0, repeats=1, matmul_size=128, models=("vit_repro", "torchvision"),
        seeds=(0,), seed_epochs=1, prepared=prepared_dir,
    )
    result = bench.run_benchmark(bc, log=lambda _: None)
    json.dumps(result)  # all of it serialises

    assert set(result["ceilings_gflops"]) == {"fp32", "bf16"} and min(result["ceilings_gflops"].values()) > 0
    macs = forward_macs(parse_model_name("Ti/16", image_size=32))
    assert result["settings"]["forward_gmacs_per_image"] == pytest.approx(macs / 1e9)
    train = {(r["model"], r["precision"]): r for r in result["train"]}
    assert set(train) == {(m, p) for m in ("vit_repro", "torchvision") for p in ("fp32", "bf16")}
    for r in train.values():
        assert r["img_per_s"] == pytest.approx(2 / r["seconds"])
        assert r["gflops"] == pytest.approx(3 * 2 * macs * r["img_per_s"] / 1e9)
        ceiling = result["ceilings_gflops"][r["precision"]]
        assert r["fraction_of_ceiling"] == pytest.approx(r["gflops"] / ceiling)
    assert {(r["model"], r["precision"]) for r in result["inference"]} >= {("vit_repro", "bf16-weights")}

    frozen = result["frozen"]
    assert frozen["runs"] == len(bench.GRID) and frozen["epochs_total"] == 10 * len(bench.GRID)
    assert frozen["images"] == 300 and frozen["feature_pass_s"] > 0 and frozen["grid_s"] > 0
    assert frozen["seed_approach_s_extrapolated"] == pytest.approx(frozen["seed_epoch_s"] * frozen["epochs_total"])
    assert frozen["speedup_vs_seed"] == pytest.approx(
        frozen["seed_approach_s_extrapolated"] / (frozen["feature_pass_s"] + frozen["grid_s"]))
    data = result["data"]
    assert data["images"] == 225 and 0 < data["cached_epoch_s"] and 0 < data["decode_epoch_s"]

    targets = {t["target"]: t for t in result["targets"]}
    assert set(targets) == set(bench.TARGETS) - {"dvc_repro_noop_seconds"}
    for t in targets.values():
        assert t["met"] == (t["value"] >= t["threshold"] if t["direction"] == ">=" else t["value"] <= t["threshold"])
    assert not math.isnan(targets["train_fp32_vs_torchvision"]["value"])
    text = bench.format_tables(result)
    assert "vit_repro" in text and "seed approach" in text and "target" in text


def test_dvc_noop_is_timed_only_when_the_pipeline_is_up_to_date(make_dvc_repo) -> None:
    repo = make_dvc_repo()
    (repo.path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    skipped = bench.dvc_noop(repo.path, repeats=1)
    assert "not up to date" in skipped["skipped"] and "hello" in skipped["skipped"]
    repo.dvc("repro")
    timed = bench.dvc_noop(repo.path, repeats=2)
    assert timed["stages"] == 1 and len(timed["seconds_all"]) == 2 and timed["seconds"] > 0
    assert (repo.path / "out.txt").read_text() == "hi\n"


def test_cli_writes_json_and_markdown(prepared_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results" / "bench.json"
    code = main(["bench", "--sections", "ceilings", "data", "--matmul-size", "128", "--repeats", "1", "--image-size", "32",
                 "--prepared", str(prepared_dir), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"environment", "settings", "ceilings_gflops", "data", "targets"}
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["cpu_cores"] >= 1
    markdown = out.with_suffix(".md").read_text()
    assert "| matmul ceiling | GFLOP/s |" in markdown and "decoding the JPEGs" in markdown
    assert "decoded-tensor cache" in capsys.readouterr().out
