"""Forward-pass throughput of vit_repro's ViT-B/16 against torchvision's vit_b_16 (same weights).

Both models are randomly initialised, torchvision's weights are copied into ours (so both compute
the same function), and each forward pass is timed in eval mode, float32, under
``torch.inference_mode``. Timings alternate between the two models to share any load drift.

    python benchmarks/forward_throughput.py --batch 8 --repeats 3 [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

from vit_repro.model import VisionTransformer, load_torchvision_weights, parse_model_name


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, falling back to ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward pass."""
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes per model (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    tv = torchvision.models.vit_b_16(weights=None, num_classes=3).eval()
    ours = VisionTransformer(parse_model_name("B/16", num_classes=3)).eval()
    load_torchvision_weights(ours, tv.state_dict())
    models = {"vit_repro B/16": ours, "torchvision vit_b_16": tv}
    x = torch.randn(args.batch, 3, 224, 224)

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        diff = (ours.forward_features(x) - _tv_features(tv, x)).abs().max().item()
        for _ in range(args.warmup):
            for model in models.values():
                model(x)
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(time_forward(model, x))

    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    base = rates["torchvision vit_b_16"]
    rows = [
        {"model": name, "batch": args.batch, "img_per_s": rate, "ratio_vs_torchvision": rate / base,
         "seconds": times[name]}
        for name, rate in rates.items()
    ]
    result = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_abs_feature_diff": diff,
        "results": rows,
    }

    print(f"torch {result['torch']}, torchvision {result['torchvision']}, python {result['python']}")
    print(f"CPU: {result['cpu']}, {result['threads']} threads; float32, eval, inference_mode, 224x224")
    print(f"median of {args.repeats} timed passes after {args.warmup} warm-up; "
          f"max |feature diff| {diff:.2e}")
    print(f"{'model':<22} {'batch':>5} {'img/s':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['model']:<22} {row['batch']:>5} {row['img_per_s']:>8.2f} {row['ratio_vs_torchvision']:>6.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _tv_features(tv: torchvision.models.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """torchvision's class token after ``encoder.ln`` (its forward without the head)."""
    z = tv._process_input(x)
    z = torch.cat([tv.class_token.expand(z.shape[0], -1, -1), z], dim=1)
    return tv.encoder(z)[:, 0]


if __name__ == "__main__":
    main()
