"""Settings: the repository's params.yaml and recipes load; bad values fail early, naming the key.

``write_params`` (also used by test_train.py and test_tracking.py) writes a modified copy of the
repository's params.yaml.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vit_repro.config import ConfigError, load_params, load_recipe, resolve_run, resolve_study

REPO = Path(__file__).resolve().parents[1]
DINOV2_FILE = "vit_s14_dinov2_p14_224.safetensors"


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_params(path: Path, updates: dict[str, Any] | None = None, shared: Path | None = None) -> Path:
    """The repo's params.yaml, deep-updated with ``updates``, written to ``path`` (a file or a folder)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    if shared is not None:
        data["backbones"]["vit_s14_dinov2"]["path"] = str(shared / "pretrained" / DINOV2_FILE)
    data = deep_update(data, updates or {})
    path = Path(path)
    if path.is_dir():
        path = path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `vit-repro` subprocess: no inherited store or repo root, this Python's scripts first."""
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "VIT_REPRO_DEVICE"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the CPU is shared: one thread per process avoids contention
    env.update(extra)
    return env


def vit_repro() -> str:
    exe = shutil.which("vit-repro", path=cli_env()["PATH"])
    assert exe, "the vit-repro console script is not installed"
    return exe


# ----------------------------------------------------------------------------- what the repo ships

def test_repo_params_and_every_recipe_load(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.study.name in params.studies
    recipes = sorted(p.stem for p in (repo_root / "experiments").glob("*.yaml"))
    assert {"baseline", "warmup", "decay", "clip", "paper"} <= set(recipes)
    for name in recipes:
        overrides = load_recipe(name, repo_root / "experiments")
        cfg = resolve_run(params, "scratch", name, 0, repo_root / "experiments")
        for key, value in overrides.items():
            assert getattr(cfg.train, key) == value, f"{name}.yaml sets {key}={value!r}, the run has {getattr(cfg.train, key)!r}"
    paper = resolve_run(params, "scratch", "paper", 0, repo_root / "experiments").train
    assert (paper.warmup, paper.decay, paper.clip_grad_norm) == (True, "cosine", 1.0)
    baseline = resolve_run(params, "scratch", "baseline", 0, repo_root / "experiments").train
    assert (baseline.warmup, baseline.decay, baseline.clip_grad_norm) == (False, "none", None)


def test_resolve_study_is_backbones_times_recipes_times_seeds(repo_root):
    params = load_params(repo_root / "params.yaml")
    runs = resolve_study(params, repo_root / "experiments")
    n = 2 * len(params.study.recipes) * len(params.study.seeds)
    assert len(runs) == n == 2 * 5 * 3
    assert len({(r.backbone, r.recipe, r.seed) for r in runs}) == n
    assert {r.backbone for r in runs} == {"scratch", "frozen"}
    assert {r.recipe for r in runs} == set(params.study.recipes)
    assert {r.seed for r in runs} == set(params.study.seeds)
    assert len({r.run_name for r in runs}) == n


def test_backbone_sections_are_applied(repo_root):
    params = load_params(repo_root / "params.yaml")
    scratch = resolve_run(params, "scratch", "baseline", 1, repo_root / "experiments")
    frozen = resolve_run(params, "frozen", "baseline", 1, repo_root / "experiments")
    assert scratch.train.weight_decay == params.scratch.weight_decay == 0.1
    assert frozen.train.weight_decay == params.frozen.weight_decay == 0.0
    assert (scratch.model, scratch.image_size, scratch.dropout) == ("B/16", 224, 0.1)  # study "full"
    assert (frozen.model, frozen.pretrained_name, frozen.dropout) == ("B/16", "vit_b16_imagenet1k", 0.0)
    assert (scratch.variant, scratch.run_name) == ("scratch-baseline", "scratch-baseline/seed1")


def test_cpu_small_study_and_full_grid(tmp_path, repo_root):
    path = write_params(tmp_path, {"study": {"name": "cpu-small", "seeds": [0, 1],
                                             "recipes": ["baseline", "warmup", "decay", "clip", "warmup-decay",
                                                         "warmup-clip", "decay-clip", "paper"]}})
    runs = resolve_study(load_params(path), repo_root / "experiments")
    assert len(runs) == 2 * 8 * 2
    assert {r.model for r in runs if r.backbone == "scratch"} == {"Ti/16"}
    assert {r.model for r in runs if r.backbone == "frozen"} == {"S/14"}


# ----------------------------------------------------------------------------- rejections

def _load_error(tmp_path: Path, updates: dict[str, Any]) -> str:
    path = write_params(tmp_path, updates)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return str(info.value)


def test_unknown_key_names_the_key(tmp_path):
    msg = _load_error(tmp_path, {"train": {"lrr": 0.01}})
    assert "train.lrr" in msg and "unknown key" in msg
    assert str(tmp_path / "params.yaml") in msg


def test_negative_lr(tmp_path):
    msg = _load_error(tmp_path, {"train": {"lr": -1e-3}})
    assert "train.lr" in msg and "greater than 0" in msg


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_warmup_fraction_out_of_range(tmp_path, fraction):
    msg = _load_error(tmp_path, {"train": {"warmup_fraction": fraction}})
    assert "train.warmup_fraction" in msg and "[0, 1)" in msg and str(fraction) in msg


def test_unknown_decay(tmp_path):
    msg = _load_error(tmp_path, {"train": {"decay": "exponential"}})
    assert "train.decay" in msg and "cosine" in msg


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "CPU"])
def test_bad_device(tmp_path, device):
    msg = _load_error(tmp_path, {"train": {"device": device}})
    assert "train.device" in msg and repr(device) in msg


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_device_strings(tmp_path, device):
    assert load_params(write_params(tmp_path, {"train": {"device": device}})).train.device == device


def test_unknown_study_name(tmp_path):
    msg = _load_error(tmp_path, {"study": {"name": "huge"}})
    assert "study.name 'huge'" in msg and "cpu-small" in msg and "full" in msg


def test_study_preset_with_unknown_backbone(tmp_path):
    msg = _load_error(tmp_path, {"studies": {"full": {"frozen_backbone": "vit_x"}}})
    assert "studies.full.frozen_backbone 'vit_x'" in msg


def test_unknown_recipe_lists_known_recipes(tmp_path, repo_root):
    params = load_params(write_params(tmp_path, {"study": {"recipes": ["baseline", "papr"]}}))
    with pytest.raises(ConfigError) as info:
        resolve_study(params, repo_root / "experiments")
    msg = str(info.value)
    assert "unknown recipe 'papr'" in msg
    assert "known recipes" in msg and "'paper'" in msg and "'baseline'" in msg


def test_unknown_key_in_recipe_file(tmp_path, repo_root):
    experiments = tmp_path / "experiments"
    shutil.copytree(repo_root / "experiments", experiments)
    (experiments / "typo.yaml").write_text("warmup: true\nclip_grad_nrom: 1.0\n")
    with pytest.raises(ConfigError) as info:
        resolve_run(load_params(repo_root / "params.yaml"), "scratch", "typo", 0, experiments)
    msg = str(info.value)
    assert "clip_grad_nrom" in msg and "unknown key" in msg and "typo.yaml" in msg


def test_bad_value_in_recipe_file_names_the_recipe(tmp_path, repo_root):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "bad.yaml").write_text("decay: step\n")
    with pytest.raises(ConfigError) as info:
        resolve_run(load_params(repo_root / "params.yaml"), "scratch", "bad", 0, experiments)
    msg = str(info.value)
    assert "experiments/bad.yaml" in msg and "decay" in msg and "'cosine'" in msg


def test_image_size_not_divisible_by_patch(tmp_path, repo_root):
    params = load_params(write_params(tmp_path, {"scratch": {"image_size": 225}}))  # B/16 in the full study
    with pytest.raises(ConfigError, match="not divisible") as info:
        resolve_study(params, repo_root / "experiments")
    assert "225" in str(info.value) and "B/16" in str(info.value)


def test_recipe_file_must_be_a_mapping(tmp_path, repo_root):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "list.yaml").write_text("- warmup\n- decay\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_recipe("list", experiments)


# ----------------------------------------------------------------------------- the command line

def test_cli_check_rejects_bad_params(tmp_path, repo_root):
    bad = write_params(tmp_path, {"train": {"lrr": 0.01}})
    proc = subprocess.run(
        [vit_repro(), "check", "--params", str(bad), "--experiments", str(repo_root / "experiments")],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: invalid settings in {bad}") and "train.lrr: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_train_rejects_bad_params_before_training(tmp_path, repo_root, prepared_dir):
    # the recipe being trained is fine; another recipe of the study is not: nothing may start
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(repo_root / "experiments", project / "experiments")
    bad = write_params(project / "bad.yaml", {"study": {"recipes": ["baseline", "papr"]}})
    proc = subprocess.run(
        [vit_repro(), "train", "--params", str(bad), "--backbone", "scratch", "--recipe", "baseline", "--seed", "0",
         "--prepared", str(prepared_dir), "--cache", str(tmp_path / "cache"), "--no-progress"],
        cwd=project, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unknown recipe 'papr'") and "Traceback" not in proc.stderr
    # nothing was started: no stage output, no MLflow store, no checkpoint, no decoded-image cache
    assert sorted(p.name for p in project.iterdir()) == ["bad.yaml", "experiments"]
    assert not (tmp_path / "cache").exists()
