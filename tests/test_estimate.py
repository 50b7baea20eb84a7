"""Tests of the time estimate (src/vit_repro/bench/estimate.py) against a synthetic benchmark results file: the arithmetic can
be checked by hand, and without a matching benchmark it says so instead of giving a number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vit_repro.bench import estimate
from vit_repro.core.config import load_params

PARAMS = {
    "data": {"datasets": ["pizza_steak_sushi", "pizza_steak_sushi_20_percent"],
             "train_sets": {"225": "pizza_steak_sushi", "450": "pizza_steak_sushi_20_percent"},
             "test_from": ["pizza_steak_sushi", "pizza_steak_sushi_20_percent"]},
    "study": {"name": "cpu"},
    "studies": {"cpu": {"backbone": "tiny"}},
    "backbones": {"tiny": {"label": "tiny", "model": "S/14", "source": "file", "path": "x.safetensors",
                           "pretraining": "none", "resize": 256, "crop": 224}},
    "train": {"epochs": 10, "batch_size": 32, "device": "auto", "precision": "fp32"},
    "scratch": {"vit": {"about": "x", "model": "vit:Ti/16", "image_size": 64,
                        "train": {"images_seen": 2250, "eval_every": 10},
                        "recipes": {"225": ["baseline"], "450": ["baseline"]}, "seeds": 2}},
    "frozen": {"head": {"about": "x", "recipes": {"225": ["baseline"]}, "seeds": 3},
               "probe": {"about": "x", "train": {"optimizer": "lbfgs"}, "recipes": {"225": ["converged"],
                                                                                     "450": ["converged"]}, "seeds": 1}},
}


@pytest.fixture
def study(tmp_path: Path, monkeypatch) -> tuple:
    """A params file, its recipes, a splits.json (225 and 450 training images sharing 225, a 211-image test set:
    661 distinct images) and a results folder; the device is the CPU whatever the machine has."""
    monkeypatch.setenv("VIT_REPRO_DEVICE", "cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "baseline.yaml").write_text("{}\n")
    (experiments / "converged.yaml").write_text("optimizer: lbfgs\n")

    def rows(prefix: str, n: int) -> list:
        return [["ds", f"{prefix}{i}.jpg", f"{prefix}{i:04d}", i % 3] for i in range(n)]

    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "splits.json").write_text(json.dumps({"test": {"images": rows("t", 211)}, "train_sets": {
        "225": {"images": rows("a", 225)}, "450": {"images": rows("a", 225) + rows("b", 225)}}}))
    results = tmp_path / "results"
    results.mkdir()
    return load_params(tmp_path / "params.yaml"), experiments, splits, results


def results_doc(key: dict, **changes) -> dict:
    doc = {
        "machine_key": key, "environment": {"date": "2026-12-01T10:00:00+00:00"},
        "study": {
            "scratch": [{"model": "vit:Ti/16", "image_size": 64, "precision": "fp32", "train_img_per_s": 32.0,
                         "eval_img_per_s": 100.0}],
            "features": [{"backbone": "tiny", "precision": "fp32", "img_per_s": 66.1}],
            "frozen_runs": {"head": {"seconds": 0.1}, "probe": {"seconds": 4.0}},
        },
        "frozen": {"per_run_s": 0.5},
    }
    return doc | changes


def test_estimate_is_the_hand_arithmetic(study) -> None:
    params, experiments, splits, results = study
    (results / "cpu.json").write_text(json.dumps(results_doc(estimate.machine_key(torch.device("cpu")))))
    lines = estimate.estimate_lines(params, experiments, results_dir=results, splits_dir=splits)
    source = f"({results / 'cpu.json'}, measured 2026-12-01)"
    # 225 images: round(2250 / 225) = 10 epochs x 7 steps x 32 = 2240 images; test 211 once (epoch 10) + the final
    #   test 211 + train 225 = 647 evaluated. 450 images: 5 epochs x 14 steps x 32 = 2240; 211 (the last epoch) +
    #   211 + 450 = 872. Two seeds each: 8960 trained / 32 img/s + 3038 evaluated / 100 img/s = 280 + 30.38 s.
    # features: 661 images / 66.1 img/s = 10 s; head: 3 runs x 0.5 s (the frozen section's, under dvc repro);
    # probe: 2 runs x 4 s. Total 310.38 + 10 + 1.5 + 8 = 329.88 s.
    assert lines == [
        f"estimate: features ≈ 10 s: 661 images at 66.1 img/s {source}",
        f"estimate: train-scratch@vit 4 runs ≈ 5 min: 8,960 images trained at 32 img/s + 3,038 evaluated at "
        f"100 img/s {source}",
        f"estimate: train-frozen@head 3 runs ≈ 2 s: 0.5 s per head run under dvc repro, MLflow included {source}",
        f"estimate: train-frozen@probe 2 runs ≈ 8 s: 4 s per probe run (fit only) {source}",
        f"estimate: total ≈ 5 min for 4 stages {source}",
    ]
    assert estimate.format_duration(329.88) == "5 min" and estimate.format_duration(2 * 3600) == "2.0 h"

    # one arm: no features stage (it is a stage of its own) and no total
    assert estimate.estimate_lines(params, experiments, arms=["vit"], results_dir=results, splits_dir=splits) == [lines[1]]
    # a results file of this benchmark (no frozen section, which format 2 had): the study section's head run
    (results / "cpu.json").write_text(json.dumps(results_doc(estimate.machine_key(torch.device("cpu")), frozen={})))
    head = estimate.estimate_lines(params, experiments, arms=["head"], results_dir=results, splits_dir=splits)
    assert head == [f"estimate: train-frozen@head 3 runs ≈ 0 s: 0.1 s per head run (fit only) {source}"]


def test_the_newest_matching_file_is_used_and_other_machines_are_ignored(study) -> None:
    params, experiments, splits, results = study
    key = estimate.machine_key(torch.device("cpu"))
    other = key | {"logical_cores": key["logical_cores"] + 1}
    old = results_doc(key, environment={"date": "2026-01-01T00:00:00+00:00"})
    old["study"]["scratch"][0]["train_img_per_s"] = 1.0
    (results / "a-old.json").write_text(json.dumps(old))
    (results / "b-other.json").write_text(json.dumps(results_doc(other, environment={"date": "2027-01-01"})))
    (results / "c-new.json").write_text(json.dumps(results_doc(key)))
    (results / "d-not-a-benchmark.json").write_text("[1, 2]")
    path, doc = estimate.find_results(key, results)
    assert path.name == "c-new.json" and doc["study"]["scratch"][0]["train_img_per_s"] == 32.0
    [line] = estimate.estimate_lines(params, experiments, arms=["vit"], results_dir=results, splits_dir=splits)
    assert "c-new.json" in line and "at 32 img/s" in line


def test_no_matching_benchmark_gives_no_number(study) -> None:
    params, experiments, splits, results = study
    key = estimate.machine_key(torch.device("cpu"))
    command = f"`vit-repro bench --sections study --out {results / estimate.machine_slug(key)}.json`"
    (results / "gpu.json").write_text(json.dumps(results_doc({"device_type": "cuda", "gpu_name": "NVIDIA H200"})))
    lines = estimate.estimate_lines(params, experiments, results_dir=results, splits_dir=splits)
    assert lines == [f"estimate: no benchmark of this machine ({estimate.describe_machine(key)}) in {results}; measure it "
                     f"with {command} (a few minutes)"]
    assert estimate.describe_machine(key).startswith(f"cpu {key['cpu_model']}, {key['logical_cores']} logical cores")

    # a matching file that lacks the arm's (model, size, precision): that stage and the total have no number
    doc = results_doc(key)
    doc["study"]["scratch"][0]["image_size"] = 224
    (results / "cpu.json").write_text(json.dumps(doc))
    lines = estimate.estimate_lines(params, experiments, results_dir=results, splits_dir=splits)
    vit = next(line for line in lines if "@vit" in line)
    assert vit == (f"estimate: train-scratch@vit 4 runs: no benchmark of vit:Ti/16 at 64 px fp32 in "
                   f"{results / 'cpu.json'}; measure it with {command}")
    assert lines[-1] == "estimate: total unknown: 1 stage(s) not benchmarked; the other 3 ≈ 20 s"
    assert all("≈" not in line for line in lines if "@vit" in line)


def test_without_splits_the_counts_are_upper_bounds_and_said_to_be(study, tmp_path: Path) -> None:
    params, experiments, _, results = study
    (results / "cpu.json").write_text(json.dumps(results_doc(estimate.machine_key(torch.device("cpu")))))
    lines = estimate.estimate_lines(params, experiments, results_dir=results, splits_dir=tmp_path / "none")
    # the archives: 225 + 450 training and 75 + 150 test images, 900 in all
    assert lines[0].startswith("estimate: features ≈ 14 s: 900 images at 66.1 img/s")
    assert lines[-1].startswith("estimate: image counts at most:") and "dvc repro splits" in lines[-1]


def test_machine_keys() -> None:
    cpu = estimate.machine_key(torch.device("cpu"))
    assert cpu == {"device_type": "cpu", "cpu_model": estimate.cpu_model(), "logical_cores": estimate.logical_cores(),
                   "isa": estimate.cpu_isa()}
    assert set(cpu["isa"]) <= set(estimate.ISA_FLAGS)
    assert estimate.machine_slug(cpu).startswith(f"cpu-{cpu['logical_cores']}core")
    slug = {(): "cpu-2core", ("avx2",): "cpu-2core-avx2", ("avx2", "avx512f"): "cpu-2core-avx512",
            ("avx2", "avx512f", "avx512_bf16"): "cpu-2core-avx512bf16", ("avx2", "amx_tile"): "cpu-2core-amx"}
    for isa, name in slug.items():
        assert estimate.machine_slug(cpu | {"logical_cores": 2, "isa": list(isa)}) == name
    assert estimate.machine_slug({"device_type": "cuda", "gpu_name": "NVIDIA H200"}) == "cuda-nvidia-h200"
