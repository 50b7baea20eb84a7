"""Tests of ``vit-repro bench`` (src/vit_repro/bench/) on tiny models: it times the core's own training step, its
numbers agree with each other and with the FLOP counts, the estimate reads what it writes, targets are judged
from a targets file, and bad input is one clear line. Speeds are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import yaml

from vit_repro.bench import cli, estimate, measure
from vit_repro.cli import main as cli_main
from vit_repro.core.config import AugmentConfig, TrainConfig, load_params
from vit_repro.core.images import Augment, ImageTransform
from vit_repro.core.networks import build_model, forward_macs
from vit_repro.core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--min-run-time", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_repo(repo: Path) -> Path:
    """A project whose studies are the committed ones shrunk: 32-48 px, batch 8, a Ti/16 backbone at 32 px (not
    fetched: random weights), 2-epoch heads, one L2 strength for the probe; augmentation in the `vit` arm."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["backbones"] = {"tiny": {"label": "tiny", "model": "Ti/16", "source": "file", "path": "none.safetensors",
                                 "pretraining": "none", "resize": 32, "crop": 32}}
    raw["studies"] = {"cpu": {"backbone": "tiny"}, "gpu": {"backbone": "tiny", "scratch": {"vit": {"image_size": 48}}}}
    raw["study"] = {"name": "cpu"}
    raw["train"]["batch_size"] = 8
    for arm in raw["scratch"].values():
        arm["image_size"] = 32
    raw["scratch"]["vit-seed"]["model"] = raw["scratch"]["vit"]["model"] = "vit:Ti/16"
    raw["scratch"]["vit"]["augment"] = {"flip": True}
    raw["frozen"]["head"]["train"] = {"epochs": 2}
    raw["frozen"]["probe"]["train"] = {"optimizer": "lbfgs", "c_grid": [1.0]}
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "targets.yaml").write_text(yaml.safe_dump({"targets": {
        "train_fp32_vs_torchvision": {"at_least": 0.001}, "train_fp32_fraction_of_ceiling": {"at_least": 1e9},
        "train_bf16_vs_torchvision": {"at_most": 1e9}, "study_section_seconds": {"at_most": 1e9}}}))
    return repo


@pytest.mark.parametrize(("name", "weights"), [("vit:B/16", tvm.ViT_B_16_Weights.IMAGENET1K_V1),
                                               ("resnet18", tvm.ResNet18_Weights.IMAGENET1K_V1)])
def test_forward_macs_match_torchvisions_published_counts(name: str, weights) -> None:
    macs = forward_macs(build_model(name, 224, num_classes=1000, device="meta"), 224)
    assert macs / 1e9 == pytest.approx(weights.meta["_ops"], abs=1e-3)  # GMACs, 3 decimals: B/16 17.564


@pytest.mark.parametrize("accum", [1, 2])
def test_the_timed_step_is_the_cores_trainer_step(accum: int) -> None:
    """One call of the timed step leaves the model exactly as one Trainer.step on the same batch does (the arm's
    optimizer, clipping, gradient accumulation and augmentation included)."""
    cfg = TrainConfig(batch_size=4, grad_accum_steps=accum, optimizer="adamw", weight_decay=0.3, clip_grad_norm=0.5)
    augment, device = AugmentConfig(flip=True, crop_scale=(0.5, 1.0)), torch.device("cpu")

    torch.manual_seed(0)
    timed = build_model("vit:Ti/16", 32, 3, dropout=0.1)
    measure.train_step(timed, cfg, device, 32, augment)()

    torch.manual_seed(0)
    reference = build_model("vit:Ti/16", 32, 3, dropout=0.1)
    trainer = Trainer(reference, cfg, device, ImageTransform(resize=(32, 32)).to_input, Augment(augment, (32, 32), 0))
    trainer.step([measure.batch(4, 32)] * accum, 4 * accum, cfg.effective_lr)

    before = build_model("vit:Ti/16", 32, 3)
    for (name, a), b, c in zip(timed.state_dict().items(), reference.state_dict().values(), before.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(timed.parameters(), before.parameters()))  # it trained


def test_study_section_measures_every_study_and_the_estimate_reads_it(tmp_path: Path, capsys, monkeypatch) -> None:
    repo = tiny_repo(tmp_path / "repo")
    out = tmp_path / "results" / "tiny.json"
    assert cli.main(["--sections", "study", "--repo", str(repo), "--experiments", str(ROOT / "experiments"),
                     "--study-images", "4", "--out", str(out), *TINY]) == 0
    result = json.loads(out.read_text())
    assert result["machine_key"] == estimate.machine_key(torch.device("cpu")) and result["sections_run"] == ["study"]
    assert result["machine"] == estimate.machine_slug(result["machine_key"]) and result["format"] == cli.FORMAT
    env = result["environment"]
    assert env["cpu_isa"] == estimate.cpu_isa() and env["torch"] and env["torch_threads"] == 1
    study = result["study"]
    assert study["studies"] == ["cpu", "gpu"]
    rows = {(r["model"], r["image_size"], r["precision"]): r for r in study["scratch"]}
    assert set(rows) == {("vit:Ti/16", 32, "fp32"), ("vit:Ti/16", 48, "fp32"), ("resnet18", 32, "fp32")}
    assert rows["vit:Ti/16", 48, "fp32"]["used_by"] == ["gpu/vit"]
    assert set(rows["vit:Ti/16", 32, "fp32"]["used_by"]) == {"cpu/vit", "cpu/vit-seed", "gpu/vit-seed"}
    # a key shared by arms is timed with the augmentation of the one that augments
    assert rows["vit:Ti/16", 32, "fp32"]["augment"]["flip"] is True and rows["resnet18", 32, "fp32"]["augment"] is None
    assert rows["vit:Ti/16", 32, "fp32"]["optimizer"] == "adamw"
    for r in rows.values():
        assert r["batch"] == 8 and r["train_img_per_s"] * r["train_step_s"] == pytest.approx(8)
        assert r["eval_img_per_s"] * r["eval_s"] == pytest.approx(4) and r["train_steps_timed"] >= 1
    [features] = study["features"]
    assert (features["backbone"], features["precision"]) == ("tiny", "fp32") and features["weights"].startswith("random")
    runs = study["frozen_runs"]
    assert runs["head"]["epochs"] == 2 and runs["head"]["dim"] == 192 and runs["head"]["train_images"] == 225
    assert runs["probe"]["optimizer"] == "lbfgs" and runs["probe"]["seconds"] > 0
    targets = {t["target"]: t for t in result["targets"]}
    assert targets["study_section_seconds"]["met"] is True
    assert targets["train_fp32_vs_torchvision"]["met"] is None  # compare did not run
    markdown = out.with_suffix(".md").read_text()
    assert capsys.readouterr().out.strip() == markdown.strip() and "| not measured |" in markdown
    assert "| vit:Ti/16 | 48 | fp32 | gpu/vit |" in markdown

    monkeypatch.setenv("VIT_REPRO_DEVICE", "cpu")
    for study_name in ("cpu", "gpu"):
        raw = yaml.safe_load((repo / "params.yaml").read_text()) | {"study": {"name": study_name}}
        (repo / "params.yaml").write_text(yaml.safe_dump(raw))
        lines = estimate.estimate_lines(load_params(repo / "params.yaml"), ROOT / "experiments", results_dir=out.parent)
        assert len(lines) == 7 and all("≈" in line and str(out) in line for line in lines), lines


def test_compare_section_runs_ours_and_torchvision_through_the_same_step(tmp_path: Path) -> None:
    repo = tiny_repo(tmp_path / "repo")
    out = tmp_path / "compare.json"
    assert cli.main(["--sections", "compare", "--repo", str(repo), "--model", "Ti/16", "--image-size", "32",
                     "--batch-size", "2", "--matmul-size", "128", "--repeats", "2", "--models", "vit_repro",
                     "torchvision", "timm", "--precisions", "fp32", "bf16", "--out", str(out), *TINY]) == 0
    compare = json.loads(out.read_text())["compare"]
    rows = {(r["model"], r["precision"], r["what"]): r for r in compare["rows"]}
    timm = [("timm", p, w) for p in ("fp32", "bf16") for w in ("train", "eval")] if "timm" in {m for m, _, _ in rows} else []
    assert set(rows) == {("matmul", p, "matmul") for p in ("fp32", "bf16")} | set(timm) | {
        (m, p, w) for m in ("vit_repro", "torchvision") for p in ("fp32", "bf16") for w in ("train", "eval")}
    macs = forward_macs(build_model("vit:Ti/16", 32, 3, device="meta"), 32)
    assert compare["forward_gmacs"] == pytest.approx(macs / 1e9)
    for (model, precision, what), r in rows.items():
        assert r["calls_timed"] >= 2  # one per round at least
        if what == "matmul":
            assert r["of_ceiling"] == pytest.approx(1) and r["gflops"] == pytest.approx(2 * 128**3 / r["seconds"] / 1e9)
            continue
        assert r["img_per_s"] * r["seconds"] == pytest.approx(2)
        passes = 3 if what == "train" else 1
        assert r["gflops"] == pytest.approx(passes * 2 * macs * r["img_per_s"] / 1e9)
        assert r["of_ceiling"] == pytest.approx(r["gflops"] / rows["matmul", precision, "matmul"]["gflops"])
    targets = {t["target"]: t for t in json.loads(out.read_text())["targets"]}
    ours, tv = rows["vit_repro", "fp32", "train"]["img_per_s"], rows["torchvision", "fp32", "train"]["img_per_s"]
    assert targets["train_fp32_vs_torchvision"]["value"] == pytest.approx(ours / tv)
    assert targets["train_fp32_vs_torchvision"]["met"] is True and targets["train_bf16_vs_torchvision"]["met"] is True
    assert targets["train_fp32_fraction_of_ceiling"]["met"] is False  # at least 1e9
    assert targets["study_section_seconds"]["met"] is None


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    def error(argv: list[str], main=cli.main) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        return err

    assert "unknown --sections speed" in error(["--sections", "speed"])
    assert "unrecognized arguments: --fast" in error(["--fast"]) and "--help" in error(["--fast"])
    assert "--batch-size must be at least 1" in error(["--batch-size", "0"])
    assert "not found" in error(["--params", str(tmp_path / "none.yaml")])
    (tmp_path / "file").write_text("")
    assert "cannot create" in error(["--out", str(tmp_path / "file" / "x.json")])
    assert "not a .json file" in error(["--out", str(tmp_path / "x.txt")])
    assert "targets file" in error(["--targets", str(tmp_path / "none.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"targets": {"fast": {"at_least": 1}}}))
    assert "unknown metric 'fast'" in error(["--targets", str(bad)])
    bad.write_text(yaml.safe_dump({"targets": {"study_section_seconds": {"at_least": 1, "at_most": 2}}}))
    assert "exactly one numeric" in error(["--targets", str(bad)])
    # through the project's command line, the options after `bench` go to the benchmark
    assert "unknown --sections nothing" in error(["bench", "--sections", "nothing"], main=cli_main)


def test_the_repository_targets_and_results_files(tmp_path: Path, monkeypatch) -> None:
    """The targets file names only metrics bench computes; every committed results file gives a number for every
    stage of every study of params.yaml on the machine it was measured on."""
    assert set(cli.load_targets(ROOT / "benchmarks" / "targets.yaml")) <= set(cli.METRICS)
    results = ROOT / "benchmarks" / "results"
    files = [p for p in sorted(results.glob("*.json")) if {"machine_key", "study"} <= set(json.loads(p.read_text()))]
    assert len(files) >= 2  # the AVX2 CPU's and the AVX-512 one's
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    monkeypatch.setenv("VIT_REPRO_DEVICE", "cpu")
    for path in files:
        key = json.loads(path.read_text())["machine_key"]
        assert estimate.find_results(key, results)[0] == path
        monkeypatch.setattr(estimate, "machine_key", lambda device, key=key: key)
        for study in raw["studies"]:
            (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw | {"study": {"name": study}}))
            lines = estimate.estimate_lines(load_params(tmp_path / "params.yaml"), ROOT / "experiments",
                                            results_dir=results, splits_dir=ROOT / "data" / "splits")
            assert lines[-1].startswith("estimate: total ≈") and path.name in lines[-1], (path.name, study, lines)
