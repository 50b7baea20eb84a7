"""DVC dependencies that cannot drift: every module a training stage executes is one of its dependencies.

``vit_repro.TRAINING_MODULES`` is the one list: dvc.yaml's train stages depend on exactly those files,
the code digest (runs, checkpoints, stage keys) covers exactly those files, and a real training run of
each kind imports no other module of the package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vit_repro import TRAINING_MODULES
from vit_repro.splits import write_splits

PACKAGE = "src/vit_repro"
TRAIN_STAGES = ("train-scratch", "train-frozen")


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["do"]["deps"] if d.startswith(PACKAGE)}


def test_train_stages_depend_on_exactly_the_training_modules(repo_root: Path) -> None:
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    expected = {f"{PACKAGE}/{m}.py" for m in TRAINING_MODULES}
    for name in TRAIN_STAGES:
        assert _code_deps(stages[name]) == expected, name
    on_disk = {p.stem for p in (repo_root / PACKAGE).glob("*.py")}
    assert set(TRAINING_MODULES) <= on_disk


def test_the_code_digest_covers_every_training_module(tmp_path: Path, monkeypatch) -> None:
    from vit_repro import runner

    package = tmp_path / "vit_repro"
    package.mkdir()
    for name in TRAINING_MODULES:
        (package / f"{name}.py").write_text((Path(runner.__file__).parent / f"{name}.py").read_text())
    monkeypatch.setattr(runner, "__file__", str(package / "runner.py"))
    before = runner.code_digest()
    for name in TRAINING_MODULES:
        path = package / f"{name}.py"
        text = path.read_text()
        path.write_text(text + "\n# changed\n")
        assert runner.code_digest() != before, name
        path.write_text(text)
    assert runner.code_digest() == before


@pytest.mark.slow
def test_a_training_run_imports_only_training_modules(tmp_path: Path, repo_root: Path, prepared_root: Path, splits) -> None:
    """Train a tiny scratch arm and a tiny frozen arm for real, then list the package modules loaded."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["scratch"] = {"vit": raw["scratch"]["vit"] | {"recipes": {"225": ["paper"]}, "seeds": 1, "image_size": 32}}
    raw["scratch"]["vit"]["train"] |= {"images_seen": 225, "eval_every": 1}
    raw["frozen"] = {"head": raw["frozen"]["head"] | {"recipes": {"225": ["clip"]}, "seeds": 1}}
    raw["report"] |= {"versus": [], "converged": None}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / ".dvc").mkdir()
    write_splits(splits, tmp_path / "data" / "splits")
    (tmp_path / "data" / "prepared").symlink_to(prepared_root)
    ids = [i.sha256 for i in splits.all_images()]
    features = tmp_path / "data" / "features"
    features.mkdir()
    save_file({"features": torch.randn(len(ids), 384)}, features / "features.safetensors", metadata={"ids": json.dumps(ids)})
    (features / "features.json").write_text(json.dumps({
        "backbone": {"name": raw["studies"]["cpu"]["backbone"], "label": "random (test)", "model": "S/14", "source": "file",
                     "origin": "test", "sha256": "0" * 64, "pretraining": "none", "provenance": "",
                     "transform": {"resize": 256, "crop": 224, "interpolation": "bicubic"}},
        "key": "test", "precision": "fp32", "dim": 384}))
    script = (
        "import json, sys\n"
        "from vit_repro import cli\n"
        "for arm in ('vit', 'head'):\n"
        "    assert cli.main(['train', '--arm', arm, '--experiments', sys.argv[1]]) == 0, arm\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vit_repro'))))\n"
    )
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "DVC_ROOT": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(repo_root / "experiments")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {m.removeprefix("vit_repro").lstrip(".") or "__init__" for m in json.loads(proc.stdout.splitlines()[-1])}
    assert loaded <= set(TRAINING_MODULES), f"imported by training but not DVC deps: {sorted(loaded - set(TRAINING_MODULES))}"
    assert {"runner", "train", "tracking", "backbone", "images"} <= loaded
    assert (tmp_path / "runs" / "vit" / "225" / "paper" / "seed0" / "run.json").is_file()
    assert (tmp_path / "runs" / "head" / "225" / "clip" / "seed0" / "predictions.csv").is_file()


def test_the_report_stage_depends_on_every_module_it_imports(tmp_path: Path, repo_root: Path) -> None:
    """Render a synthetic study through `vit-repro report` and compare the modules it loads with its DVC deps."""
    import numpy as np

    from runs_fixture import EXPERIMENTS, fixture_params, predictions, write_run
    from vit_repro.config import resolve_study

    params = fixture_params(tmp_path)
    rng = np.random.default_rng(0)
    for cfg in resolve_study(params, EXPERIMENTS):
        write_run(tmp_path / "runs", cfg, predictions(0.8, rng))
    script = (
        "import json, sys\n"
        "from vit_repro import cli\n"
        "assert cli.main(['report', '--runs', 'runs', '--out', 'reports', '--experiments', sys.argv[1]]) == 0\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vit_repro'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(EXPERIMENTS)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {m.replace(".", "/") for m in json.loads(proc.stdout.splitlines()[-1])}
    deps = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    covered = {d.removesuffix(".py").removeprefix("src/") for d in deps if d.startswith(PACKAGE)}
    covered |= {"vit_repro"} if "vit_repro/__init__" in covered else set()
    missing = sorted(m for m in loaded if not any(m == c or m.startswith(c + "/") for c in covered))
    assert not missing, f"`vit-repro report` imports modules that are not deps of the report stage: {missing}"
