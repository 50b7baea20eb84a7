"""Tests of ``vit-repro bench`` (src/vit_repro/bench/) on tiny models: the numbers it reports are consistent with
each other and with the FLOP counts, targets are judged from a targets file, results are written as JSON and
Markdown, and bad input is one clear line. Nothing here trains a real study run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import yaml

from vit_repro import bench, plan
from vit_repro.cli import main as cli_main
from vit_repro.core.config import load_params, resolve_arm
from vit_repro.core.networks import build_model, forward_macs

ROOT = Path(__file__).resolve().parents[1]
GRID = ["baseline", "warmup", "decay", "clip", "warmup-decay", "warmup-clip", "decay-clip", "paper"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other and distort timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def targets_file(tmp_path: Path) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({
        "targets": {"train_fp32_vs_torchvision": {"at_least": 0.01}, "train_fp32_fraction_of_ceiling": {"at_most": 1.0},
                    "train_bf16_vs_torchvision": {"at_least": 1e9}, "dvc_repro_noop_seconds": {"at_most": 10}},
        "frozen_grid": {"arm": "head", "train_set": "225", "recipes": GRID, "seeds": 20},
    }))
    return path


@pytest.mark.parametrize(("name", "weights"), [
    ("vit:B/16", tvm.ViT_B_16_Weights.IMAGENET1K_V1), ("vit:L/16", tvm.ViT_L_16_Weights.IMAGENET1K_V1),
    ("resnet18", tvm.ResNet18_Weights.IMAGENET1K_V1),
])
def test_forward_macs_match_torchvisions_published_counts(name: str, weights) -> None:
    macs = forward_macs(build_model(name, 224, num_classes=1000, device="meta"), 224)
    assert macs / 1e9 == pytest.approx(weights.meta["_ops"], abs=1e-3)  # torchvision publishes GMACs, 3 decimals
    if name == "vit:B/16":
        assert weights.meta["_ops"] == pytest.approx(17.564, abs=1e-3)


def test_throughput_rows_are_consistent_and_written(tmp_path: Path, targets_file: Path, capsys) -> None:
    out = tmp_path / "results" / "tiny.json"
    code = bench.main(["--sections", "ceilings", "train", "inference", "--model", "Ti/16", "--image-size", "32",
                       "--batch-size", "2", "--repeats", "2", "--min-run-time", "0.05", "--matmul-size", "384",
                       "--models", "vit_repro", "torchvision", "--precisions", "fp32", "bf16", "--threads", "1",
                       "--targets", str(targets_file),
                       "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["machine_key"] == plan.machine_key(torch.device("cpu"))
    assert result["machine"] == plan.machine_slug(result["machine_key"])
    assert result["sections_run"] == ["ceilings", "train", "inference"]
    assert set(result["ceilings_gflops"]) == {"fp32", "bf16"} and min(result["ceilings_gflops"].values()) > 0

    macs = forward_macs(build_model("vit:Ti/16", 32, 3, device="meta"), 32)
    assert result["settings"]["forward_gmacs_per_image"] == pytest.approx(macs / 1e9)
    train = {(r["model"], r["precision"]): r for r in result["train"]}
    assert set(train) == {(m, p) for m in ("vit_repro", "torchvision") for p in ("fp32", "bf16")}
    inference = {(r["model"], r["precision"]): r for r in result["inference"]}
    assert ("vit_repro", "bf16-weights") in inference
    for section, rows, passes in (("train", train, 3), ("inference", inference, 1)):
        for r in rows.values():
            assert r["section"] == section and r["batch"] == 2 and len(r["seconds_rounds"]) == 2
            assert r["img_per_s"] * r["seconds"] == pytest.approx(2)
            assert r["gflops"] == pytest.approx(passes * 2 * macs * r["img_per_s"] / 1e9)
            assert r["fraction_of_ceiling"] > 0
            if r["precision"] == "fp32":  # against the ceiling of the same round: a tiny model is far below it
                assert r["fraction_of_ceiling"] < 1, r  # (bf16 matmuls are emulated, as slow, on CPUs without bf16)

    targets = {t["target"]: t for t in result["targets"]}
    ours, tv = train["vit_repro", "fp32"]["img_per_s"], train["torchvision", "fp32"]["img_per_s"]
    assert targets["train_fp32_vs_torchvision"]["value"] == pytest.approx(ours / tv)
    assert targets["train_fp32_vs_torchvision"]["met"] is True  # at least 0.01
    assert targets["train_fp32_fraction_of_ceiling"]["value"] == train["vit_repro", "fp32"]["fraction_of_ceiling"]
    assert targets["train_bf16_vs_torchvision"]["met"] is False  # at least 1e9
    assert targets["dvc_repro_noop_seconds"]["met"] is None and "not measured" in targets["dvc_repro_noop_seconds"]["detail"]

    markdown = out.with_suffix(".md").read_text()
    assert "| model | precision | img/s |" in markdown and "**matmul ceilings**" in markdown
    assert "| train_bf16_vs_torchvision |" in markdown and "| NO |" in markdown and "not measured" in markdown
    assert capsys.readouterr().out.strip() == markdown.strip()


def _tiny_params(repo: Path) -> Path:
    """params.yaml with the study's arms at 32-48 px, batch 8, a Ti/16 backbone at 32 px (not fetched: random
    weights), 2-epoch heads and one L2 strength for the probe."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["backbones"] = {"tiny": {"label": "tiny", "model": "Ti/16", "source": "file", "path": "none.safetensors",
                                 "pretraining": "none", "resize": 32, "crop": 32}}
    raw["studies"] = {"cpu": {"backbone": "tiny"}, "gpu": {"backbone": "tiny", "scratch": {"vit": {"image_size": 48}}}}
    raw["study"] = {"name": "cpu"}
    raw["train"]["batch_size"] = 8
    for arm in raw["scratch"].values():
        arm["image_size"] = 32
    raw["scratch"]["vit-seed"]["model"] = raw["scratch"]["vit"]["model"] = "vit:Ti/16"
    raw["frozen"]["head"]["train"] = {"epochs": 2}
    raw["frozen"]["probe"]["train"] = {"optimizer": "lbfgs", "c_grid": [1.0]}
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return repo / "params.yaml"


def test_study_section_measures_every_model_of_every_study_and_plan_reads_it(
        tmp_path: Path, targets_file: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    params_file = _tiny_params(repo)
    out = repo / "results" / "study.json"
    code = bench.main(["--sections", "study", "--repo", str(repo), "--experiments", str(ROOT / "experiments"),
                       "--targets", str(targets_file), "--min-run-time", "0", "--study-images", "4", "--out", str(out)])
    assert code == 0
    study = json.loads(out.read_text())["study"]
    assert study["studies"] == ["cpu", "gpu"] and study["seconds"] > 0
    rows = {(r["model"], r["image_size"], r["precision"]): r for r in study["scratch"]}
    assert set(rows) == {("vit:Ti/16", 32, "fp32"), ("vit:Ti/16", 48, "fp32"), ("resnet18", 32, "fp32")}
    assert rows["vit:Ti/16", 48, "fp32"]["used_by"] == ["gpu/vit"]
    assert set(rows["vit:Ti/16", 32, "fp32"]["used_by"]) == {"cpu/vit-seed", "cpu/vit", "gpu/vit-seed"}
    for r in rows.values():
        assert r["batch"] == 8 and r["train_img_per_s"] * r["train_step_s"] == pytest.approx(8)
        assert r["eval_img_per_s"] * r["eval_s"] == pytest.approx(4) and r["train_steps_timed"] >= 1
    # a key shared by arms is timed with the augmentation of the one that has any (none in the committed params)
    assert all(r["augment"] is None for r in rows.values())
    assert [(f["backbone"], f["precision"]) for f in study["features"]] == [("tiny", "fp32")]
    assert study["features"][0]["weights"].startswith("random")
    runs = study["frozen_runs"]
    assert runs["head"]["arm"] == "head" and runs["head"]["epochs"] == 2 and runs["head"]["dim"] == 192
    assert runs["probe"]["optimizer"] == "lbfgs" and runs["probe"]["seconds"] > 0

    monkeypatch.setenv("VIT_REPRO_DEVICE", "cpu")
    lines = plan.estimate_lines(load_params(params_file), ROOT / "experiments", results_dir=out.parent,
                                splits_dir=tmp_path / "no-splits")
    stages = [line for line in lines if "@" in line or "features" in line.split("≈")[0]]
    assert len(stages) == 6 and all("≈" in line and str(out) in line for line in stages), lines
    assert any(line.startswith("estimate: total ≈") for line in lines)


def test_bad_section_targets_or_repo_data_are_one_line_errors(tmp_path: Path, targets_file: Path, capsys) -> None:
    def error(argv: list[str]) -> str:
        assert bench.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "unknown section(s) speed" in error(["--sections", "speed", "--targets", str(targets_file)])
    assert "targets file" in error(["--sections", "ceilings", "--targets", str(tmp_path / "none.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"targets": {"fast": {"at_least": 1}}, "frozen_grid": {}}))
    assert "unknown metric 'fast'" in error(["--sections", "ceilings", "--targets", str(bad)])
    bad.write_text(yaml.safe_dump({"targets": {"dvc_repro_noop_seconds": {"at_least": 1, "at_most": 2}},
                                   "frozen_grid": {"arm": "head", "train_set": "225", "recipes": ["baseline"], "seeds": 1}}))
    assert "exactly one numeric" in error(["--sections", "ceilings", "--targets", str(bad)])
    _tiny_params(tmp_path / "empty")
    err = error(["--sections", "frozen", "--repo", str(tmp_path / "empty"), "--targets", str(targets_file)])
    assert "section frozen" in err and "data/splits/splits.json" in err and "dvc repro features" in err
    err = error(["--sections", "data", "--repo", str(tmp_path / "empty"), "--targets", str(targets_file)])
    assert "section data" in err and "data/prepared/pizza_steak_sushi" in err
    # through the project's command line, the options after `bench` go to the benchmark
    assert cli_main(["bench", "--", "--sections", "nothing", "--targets", str(targets_file)]) == 2
    assert "unknown section(s) nothing" in capsys.readouterr().err


def test_default_run_skips_a_section_whose_data_is_missing(tmp_path: Path, targets_file: Path) -> None:
    repo = tmp_path / "repo"
    _tiny_params(repo)
    opts = bench.Options(sections=("frozen", "data"), repo=repo, targets=targets_file)
    result = bench.run_benchmark(opts, log=lambda _: None)
    assert set(result["skipped"]) == {"frozen", "data"} and result["sections_run"] == []
    assert "not measured" in bench.render(result)


def test_the_repository_targets_file_is_valid() -> None:
    targets = bench.load_targets(ROOT / "benchmarks" / "targets.yaml")
    assert targets.grid == bench.Grid("head", "225", tuple(GRID), 20)
    frozen = targets.targets["frozen_grid_vs_one_feature_pass"]
    assert (frozen["bound"], frozen["threshold"]) == ("at_most", 1.5)
    assert set(targets.targets) <= set(bench.METRICS)


def test_frozen_copy_runs_exactly_the_grid(tmp_path: Path) -> None:
    """The frozen section's temporary copy: the working tree's files in a new git repo, the built data copied in,
    no earlier outputs, and a params override under which the head arm is the grid: 8 recipes x 20 seeds on 225."""
    repo = tmp_path / "repo"
    for rel in ("params.yaml", "dvc.yaml", "experiments", ".dvc/config", ".gitignore"):
        src = ROOT / rel
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, repo / rel) if src.is_dir() else shutil.copy2(src, repo / rel)
    for rel in ("data/splits/splits.json", "data/features/features.json", "models/pretrained/backbone.json",
                "runs/head/old.txt"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("{}")
    env = bench._env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    (repo / "untracked.txt").write_text("new file, not ignored: copied")

    copy = tmp_path / "copy"
    bench.copy_repo(repo, copy, env)
    bench.grid_params(copy / "params.yaml", bench.Grid("head", "225", tuple(GRID), 20))
    for rel in ("dvc.yaml", "experiments/paper.yaml", "untracked.txt", "data/splits/splits.json",
                "data/features/features.json", "models/pretrained/backbone.json"):
        assert (copy / rel).is_file(), rel
    assert not (copy / "runs").exists()
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=copy, capture_output=True).returncode == 0  # committed
    runs = resolve_arm(load_params(copy / "params.yaml"), "frozen", "head", copy / "experiments")
    assert len(runs) == 160 and {r.train_set for r in runs} == {"225"}
    assert sorted({r.recipe for r in runs}) == sorted(GRID) and {r.seed for r in runs} == set(range(20))
    before, after = load_params(repo / "params.yaml"), load_params(copy / "params.yaml")
    assert after.scratch == before.scratch and after.frozen["probe"] == before.frozen["probe"]
    with pytest.raises(bench.BenchError, match="not a frozen arm"):
        bench.grid_params(copy / "params.yaml", bench.Grid("vit", "225", ("baseline",), 1))


def test_dvc_noop_is_timed_only_when_the_pipeline_is_up_to_date(make_dvc_repo) -> None:
    repo = make_dvc_repo()
    (repo.path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    skipped = bench.dvc_noop(repo.path, repeats=1)
    assert "not up to date" in skipped["skipped"] and "hello" in skipped["skipped"]
    repo.dvc("repro")
    timed = bench.dvc_noop(repo.path, repeats=1)
    assert timed["stages"] == 1 and timed["seconds"] > 0
