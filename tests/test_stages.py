"""DVC dependencies that cannot drift: the training identity is the core folder, and the core is all a run executes.

The train stages depend on one folder, ``src/vit_repro/core``; the code digest of every run, checkpoint and
stage key covers exactly that folder's sources; the core imports nothing of the shell (MLflow, the CLI,
the stage loop, the benchmark, estimates); and a real training run executes no package module outside it.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vit_repro import core
from vit_repro.core.splits import write_splits

PACKAGE = "src/vit_repro"
CORE = f"{PACKAGE}/core"
TRAIN_STAGES = ("train-scratch", "train-frozen")
SHELL_IMPORTS = {"mlflow", "argparse", "tqdm.contrib"}  # what the core must not import (torch itself imports argparse)


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["do"]["deps"] if d.startswith(PACKAGE)}


def test_train_stages_depend_on_the_core_folder_alone(repo_root: Path) -> None:
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name in TRAIN_STAGES:
        assert _code_deps(stages[name]) == {CORE}, name


def test_the_code_digest_covers_every_core_source_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "core"
    shutil.copytree(core.CORE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(core, "CORE", copy)
    before = core.source_digest()
    sources = sorted(copy.rglob("*.py"))
    assert {p.name for p in sources} >= {"train.py", "run.py", "model.py", "record.py", "config.py"}
    for path in sources:
        text = path.read_text()
        path.write_text(text + "\n# changed\n")
        assert core.source_digest() != before, path.name
        path.write_text(text)
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"compiled")
    (copy / "notes.txt").write_text("not code")
    assert core.source_digest() == before


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in a source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def test_the_core_imports_nothing_of_the_shell() -> None:
    """No MLflow, no argument parsing, nothing of the package outside the core (a relative import of level >= 2)."""
    found = []
    for path in sorted(core.CORE.rglob("*.py")):
        for module, level in _imports(path):
            top = module.split(".")[0]
            if level >= 2 or top == "vit_repro" or top in SHELL_IMPORTS or module in SHELL_IMPORTS:
                found.append(f"{path.name}: {'.' * level}{module}")
    assert not found, f"the core imports the shell: {found}"


def test_the_core_has_short_single_purpose_functions() -> None:
    """No function of the core over 60 lines or 8 parameters (self and keyword-only options count too)."""
    long = []
    for path in sorted(core.CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                n = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - (args.args[:1] != [] and
                                                                                      args.args[0].arg in ("self", "cls"))
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or n > 8:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, {n} parameters")
    assert not long, long


def _study_repo(tmp_path: Path, repo_root: Path, prepared_root: Path, splits) -> dict:
    """A repository folder with a tiny scratch arm and a tiny frozen arm (random features), ready to train."""
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
    return {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "DVC_ROOT": str(tmp_path),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


CORE_ONLY_RUN = """
import json, sys
from pathlib import Path
import torch
from vit_repro.core.config import load_params, resolve_arm
from vit_repro.core.features import load_features
from vit_repro.core.provenance import data_info, provenance
from vit_repro.core.run import ArmData, Context, backbone_record, train_run
from vit_repro.core.splits import read_splits

params, root, cpu = load_params("params.yaml"), Path("."), torch.device("cpu")
splits = read_splits(root / "data" / "splits")
for kind, arm in (("scratch", "vit"), ("frozen", "head")):
    cfg = resolve_arm(params, kind, arm, sys.argv[1])[0]
    features = load_features(root / "data" / "features") if kind == "frozen" else None
    data = ArmData(kind, splits, root / "data" / "prepared", cfg.image_size, features)
    ctx = Context(provenance(root, cpu), data_info(splits, root / "data" / "prepared", root),
                  backbone_record(features) if features else None)
    result = train_run(cfg, data, ctx, cpu, root / "core-runs" / cfg.out_dir)
    assert result.record.mlflow is None and result.record.provenance.code_digest, kind
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.slow
def test_a_training_run_executes_only_the_core(tmp_path: Path, repo_root: Path, prepared_root: Path, splits) -> None:
    """Train a tiny scratch run and a tiny frozen run for real with the core alone, then through `vit-repro train`:
    the core alone loads no package module outside it and nothing of MLflow; the CLI's runs record the core's digest."""
    env = _study_repo(tmp_path, repo_root, prepared_root, splits)
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY_RUN, str(repo_root / "experiments")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    package = {m for m in loaded if m.startswith("vit_repro.")}
    assert {"vit_repro.core.train", "vit_repro.core.run", "vit_repro.core.images"} <= package
    assert {m for m in package if not m.startswith("vit_repro.core")} == set(), "a run executed code outside the core"
    assert not [m for m in loaded if m.split(".")[0] == "mlflow"]
    for folder in ("vit/225/paper/seed0", "head/225/clip/seed0"):
        assert (tmp_path / "core-runs" / folder / "predictions.csv").is_file()

    script = ("import sys\nfrom vit_repro import cli\nfor arm in ('vit', 'head'):\n"
              "    assert cli.main(['train', '--arm', arm, '--experiments', sys.argv[1]]) == 0, arm\n")
    proc = subprocess.run([sys.executable, "-c", script, str(repo_root / "experiments")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ("vit/225/paper/seed0", "head/225/clip/seed0"):
        record = json.loads((tmp_path / "runs" / folder / "run.json").read_text())
        assert record["provenance"]["code_digest"] == core.source_digest() and record["mlflow"]["run_id"]
        core_run = json.loads((tmp_path / "core-runs" / folder / "run.json").read_text())
        assert record["test"] == core_run["test"], "the shell changed a number"
    assert (tmp_path / "runs" / "vit" / "layers.txt").read_text().startswith("vit:Ti/16 at 32 px")


def test_the_report_stage_depends_on_every_module_it_imports(tmp_path: Path, repo_root: Path) -> None:
    """Render a synthetic study through `vit-repro report` and compare the modules it loads with its DVC deps."""
    import numpy as np

    from runs_fixture import EXPERIMENTS, fixture_params, predictions, write_run
    from vit_repro.core.config import resolve_study

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
    covered |= {c.removesuffix("/__init__") for c in covered if c.endswith("/__init__")}
    # the command line only parses the arguments that the stage's `cmd` spells out, and calls build_report
    missing = sorted(m for m in loaded - {"vit_repro/cli"} if not any(m == c or m.startswith(c + "/") for c in covered))
    assert not missing, f"`vit-repro report` imports modules that are not deps of the report stage: {missing}"
