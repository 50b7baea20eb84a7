"""Settings: the repository's params.yaml, its studies and recipes load; bad values fail early, naming the key.

``write_params`` (also used by test_train.py and test_tracking.py) writes a modified copy of the
repository's params.yaml.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vit_repro.core import paper
from vit_repro.core.config import ConfigError, load_params, load_recipe, resolve_run, resolve_study

from helpers import cli_env, vit_repro_exe, write_params


# ----------------------------------------------------------------------------- what the repo ships

def test_repo_params_and_every_recipe_load(repo_root):
    params = load_params(repo_root / "params.yaml")
    recipes = sorted(p.stem for p in (repo_root / "experiments").glob("*.yaml"))
    for recipe in recipes:
        load_recipe(recipe, repo_root / "experiments")
    used = {r for kind in ("scratch", "frozen") for arm in getattr(params, kind).values() for rs in arm.recipes.values()
            for r in rs}
    assert used <= set(recipes)
    for path in (repo_root / "experiments").glob("*.yaml"):  # big_vision style: what it reproduces and what to expect
        first, second = path.read_text().splitlines()[:2]
        assert first.startswith("# ") and second.startswith("# Expect"), path.name


def test_the_study_is_every_arm_times_its_recipes_times_its_seeds(repo_root):
    params = load_params(repo_root / "params.yaml")
    runs = resolve_study(params, repo_root / "experiments")
    expected = sum(arm.seeds * sum(len(r) for r in arm.recipes.values())
                   for kind in ("scratch", "frozen") for arm in getattr(params, kind).values())
    assert len(runs) == expected
    assert len({r.run_name for r in runs}) == len(runs)  # identities are unique
    head = [r for r in runs if r.arm == "head"]
    assert {r.seed for r in head} == set(range(20))  # the frozen arm's power: 20 seeds
    assert {(r.train_set, r.recipe) for r in head} >= {("225", "clip"), ("225", "clip-keep-last"), ("450", "baseline")}


def test_arm_recipe_and_study_settings_are_applied_in_order(repo_root):
    params = load_params(repo_root / "params.yaml")
    seed = resolve_run(params, "scratch", "vit-seed", "225", "baseline", 0, repo_root / "experiments")
    assert (seed.model, seed.image_size, seed.train.weight_decay, seed.train.drop_last) == ("vit:Ti/16", 224, 0.1, False)
    vit = resolve_run(params, "scratch", "vit", "225", "paper", 1, repo_root / "experiments")
    assert vit.train.warmup and vit.train.decay == "cosine" and vit.train.clip_grad_norm == 1.0  # the recipe
    assert vit.train.optimizer == "adamw" and vit.train.lr_scaling == "linear"  # the arm
    assert vit.train.effective_lr == pytest.approx(3e-3 * 32 / 4096)  # the ImageNet row's rate, linearly scaled
    assert vit.train.warmup_fraction == paper.WARMUP_FRACTION
    head = resolve_run(params, "frozen", "head", "225", "clip-keep-last", 0, repo_root / "experiments")
    assert head.model == f"vit:{params.backbone.model}" and head.backbone == params.backbone
    assert head.train.drop_last is False and head.train.clip_grad_norm == 1.0


def test_another_study_is_one_name_away(tmp_path, repo_root):
    full = load_params(write_params(tmp_path, {"study": {"name": "full"}}))
    assert full.backbone_name == "vit_b16_imagenet1k" and full.backbone.source == "torchvision"
    assert full.scratch["vit-seed"].model == "vit:B/16"
    gpu = load_params(write_params(tmp_path, {"study": {"name": "gpu"}}))
    assert gpu.scratch["vit"].image_size == 224 and gpu.scratch["vit"].train["images_seen"] > \
        load_params(repo_root / "params.yaml").scratch["vit"].train["images_seen"]
    for name in ("cpu", "gpu", "full"):
        resolve_study(load_params(write_params(tmp_path, {"study": {"name": name}})), repo_root / "experiments")


# ----------------------------------------------------------------------------- bad values name the key

def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lrr: unknown key"):
        load_params(write_params(tmp_path, {"train": {"lrr": 0.01}}))


def test_negative_lr(tmp_path, repo_root):
    with pytest.raises(ConfigError, match=r"train.lr: Input should be greater than 0"):
        load_params(write_params(tmp_path, {"train": {"lr": -0.1}}))
    params = load_params(write_params(tmp_path, {"scratch": {"vit": {"train": {"lr": -0.1}}}}))  # an arm's override
    with pytest.raises(ConfigError, match=r"scratch.vit.train.*lr: Input should be greater than 0"):
        resolve_study(params, repo_root / "experiments")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_warmup_fraction_out_of_range(tmp_path, repo_root, fraction):
    with pytest.raises(ConfigError, match="train.warmup_fraction"):
        load_params(write_params(tmp_path, {"train": {"warmup_fraction": fraction}}))


def test_unknown_decay(tmp_path, repo_root):
    with pytest.raises(ConfigError, match="train.decay: Input should be 'none', 'cosine' or 'linear'"):
        load_params(write_params(tmp_path, {"train": {"decay": "step"}}))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_bad_device(tmp_path, repo_root, device):
    with pytest.raises(ConfigError, match="train.device: Value error, must be auto, cpu, cuda, cuda:N or mps"):
        load_params(write_params(tmp_path, {"train": {"device": device}}))


def test_unknown_study_name(tmp_path):
    with pytest.raises(ConfigError, match="study.name 'nope' is not one of studies"):
        load_params(write_params(tmp_path, {"study": {"name": "nope"}}))


def test_study_with_unknown_backbone_or_arm(tmp_path):
    with pytest.raises(ConfigError, match="backbone 'nope' is not one of backbones"):
        load_params(write_params(tmp_path, {"studies": {"cpu": {"backbone": "nope"}}}))
    with pytest.raises(ConfigError, match=r"studies.cpu.scratch.vitt: no such arm"):
        load_params(write_params(tmp_path, {"studies": {"cpu": {"scratch": {"vitt": {"seeds": 1}}}}}))


def test_unknown_train_set_or_model(tmp_path):
    with pytest.raises(ConfigError, match=r"train sets \['900'\] are not in data.train_sets"):
        load_params(write_params(tmp_path, {"scratch": {"vit": {"recipes": {"900": ["paper"]}}}}))
    with pytest.raises(ConfigError, match="unknown model 'vgg16'"):
        load_params(write_params(tmp_path, {"scratch": {"vit": {"model": "vgg16"}}}))


def test_unknown_recipe_lists_known_recipes(tmp_path, repo_root):
    params = load_params(write_params(tmp_path, {"scratch": {"vit": {"recipes": {"225": ["papr"]}}}}))
    with pytest.raises(ConfigError, match="unknown recipe 'papr'") as info:
        resolve_study(params, repo_root / "experiments")
    assert "'paper'" in str(info.value)


def test_unknown_key_in_recipe_file(tmp_path, repo_root):
    experiments = tmp_path / "experiments"
    shutil.copytree(repo_root / "experiments", experiments)
    (experiments / "typo.yaml").write_text("# x\n# Expect: y\nwarmpu: true\n")
    with pytest.raises(ConfigError, match="warmpu: unknown key"):
        load_recipe("typo", experiments)


def test_bad_value_in_recipe_file_names_the_recipe(tmp_path, repo_root):
    experiments = tmp_path / "experiments"
    shutil.copytree(repo_root / "experiments", experiments)
    (experiments / "paper.yaml").write_text("clip_grad_norm: -1\n")
    with pytest.raises(ConfigError, match=r"experiments/paper.yaml.*clip_grad_norm"):
        resolve_study(load_params(repo_root / "params.yaml"), experiments)


def test_image_size_not_divisible_by_patch(tmp_path, repo_root):
    params = load_params(write_params(tmp_path, {"scratch": {"vit": {"image_size": 60}}}))
    with pytest.raises(ConfigError, match="not divisible") as info:
        resolve_study(params, repo_root / "experiments")
    assert "scratch.vit" in str(info.value)


def test_recipe_file_must_be_a_mapping(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "list.yaml").write_text("- warmup\n- decay\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_recipe("list", experiments)


# ----------------------------------------------------------------------------- the command line

def test_cli_check_rejects_bad_params_in_one_line(tmp_path, repo_root):
    bad = write_params(tmp_path, {"train": {"lrr": 0.01}})
    proc = subprocess.run([vit_repro_exe(), "check", "--params", str(bad), "--experiments", str(repo_root / "experiments")],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: invalid settings in {bad}") and "train.lrr: unknown key" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_train_rejects_a_bad_recipe_anywhere_in_the_study_before_training(tmp_path, repo_root):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(repo_root / "experiments", project / "experiments")
    bad = write_params(project / "params.yaml", {"scratch": {"resnet": {"recipes": {"225": ["papr"]}}}})
    proc = subprocess.run([vit_repro_exe(), "train", "--arm", "head", "--params", str(bad)],
                          cwd=project, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unknown recipe 'papr'") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["experiments", "params.yaml"]  # nothing was started
