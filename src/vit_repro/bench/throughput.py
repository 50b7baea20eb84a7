"""The ``ceilings``, ``train`` and ``inference`` sections: matmul ceilings and the three ViT implementations
(ours, torchvision's, timm's) timed in one round-robin loop."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from .options import IMPLEMENTATIONS, NUM_CLASSES, TRAIN_STEP_FLOPS_PER_FORWARD, BenchError, Options
from .timing import Job, interleaved, tf32_off, throughput_row


def build_implementation(kind: str, model: str, image_size: int, attention: str = "auto"):
    """The same ViT from three libraries; ``None`` when ``kind``'s library is not installed."""
    from ..core.model import VisionTransformer, parse_model_name

    cfg = parse_model_name(model, image_size=image_size, num_classes=NUM_CLASSES)
    if kind == "vit_repro":
        return VisionTransformer(cfg, attention=attention)
    common = dict(patch_size=cfg.patch_size, num_heads=cfg.num_heads, num_classes=cfg.num_classes)
    if kind == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

        return TorchvisionViT(image_size=cfg.image_size, num_layers=cfg.num_layers, hidden_dim=cfg.hidden_dim,
                              mlp_dim=cfg.mlp_dim, **common)
    if kind == "timm":
        try:
            from timm.models.vision_transformer import VisionTransformer as TimmViT
        except ImportError:
            return None
        return TimmViT(img_size=cfg.image_size, embed_dim=cfg.hidden_dim, depth=cfg.num_layers,
                       mlp_ratio=cfg.mlp_dim / cfg.hidden_dim, **common)
    raise BenchError(f"unknown model implementation {kind!r}; choose from {', '.join(IMPLEMENTATIONS)}")


def forward_gmacs(model: str, image_size: int, num_classes: int = NUM_CLASSES) -> float:
    """GMACs of one image's forward pass of a ``models.build_model`` name, counted on the meta device."""
    from ..core.networks import build_model, forward_macs

    return forward_macs(build_model(model, image_size, num_classes, device="meta"), image_size) / 1e9


def native_bf16(device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX
    (elsewhere CPUs emulate it: a 1024 matmul ran at 0.4 GFLOP/s on an AVX2 core, against 16 in float32)."""
    from ..core.devices import bf16_supported
    from ..plan import cpu_isa

    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa()))
    return bf16_supported(device)


def precisions_for(opts: Options, device) -> tuple[str, ...]:
    """The precisions of the ceilings/train/inference sections: as asked (bf16 only where it can run at all), or
    by default fp32 and, where the device computes in bf16 natively, bf16."""
    from ..core.devices import bf16_supported

    if opts.precisions is None:
        return ("fp32", "bf16") if native_bf16(device) else ("fp32",)
    return tuple(p for p in opts.precisions if p == "fp32" or bf16_supported(device))


def ceiling_jobs(opts: Options, device) -> list[Job]:
    import torch

    jobs = []
    n = opts.matmul_size
    for precision in precisions_for(opts, device):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        jobs.append(Job("ceilings", "matmul", precision, lambda a=a, b=b: a @ b, 0, 2.0 * n**3))
    return jobs


def model_jobs(opts: Options, device, train: bool, inference: bool) -> list[Job]:
    """Training steps and/or forward passes of each installed implementation in each precision."""
    import torch
    import torch.nn.functional as F

    from ..core.devices import autocast

    macs = forward_gmacs(f"vit:{opts.model}", opts.image_size) * 1e9
    x = torch.randn(opts.batch_size, 3, opts.image_size, opts.image_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (opts.batch_size,), device=device)
    jobs: list[Job] = []
    for kind in opts.implementations:
        torch.manual_seed(0)
        module = build_implementation(kind, opts.model, opts.image_size, opts.attention)
        if module is None:
            continue
        module = module.to(device)
        model = torch.compile(module) if opts.compile and kind == "vit_repro" else module
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, foreach=True)  # as train.build_optimizer
        for precision in precisions_for(opts, device):
            if train:
                def step(model=model, module=module, optimizer=optimizer, precision=precision) -> None:
                    module.train()
                    with autocast(device, precision):
                        loss = F.cross_entropy(model(x).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                jobs.append(Job("train", kind, precision, step, opts.batch_size,
                                TRAIN_STEP_FLOPS_PER_FORWARD * 2 * macs * opts.batch_size))
            if inference:
                def forward(model=model, module=module, precision=precision) -> None:
                    module.eval()
                    with torch.inference_mode(), autocast(device, precision):
                        model(x)

                jobs.append(Job("inference", kind, precision, forward, opts.batch_size, 2 * macs * opts.batch_size))
        if inference and kind == "vit_repro" and "bf16" in precisions_for(opts, device):
            torch.manual_seed(0)
            half = build_implementation(kind, opts.model, opts.image_size, opts.attention).to(device, torch.bfloat16).eval()
            half = torch.compile(half) if opts.compile else half
            xb = x.to(torch.bfloat16)

            def forward_bf16_weights(half=half) -> None:
                with torch.inference_mode():
                    half(xb)

            jobs.append(Job("inference", kind, "bf16-weights", forward_bf16_weights, opts.batch_size,
                            2 * macs * opts.batch_size))
    return jobs


def throughput_sections(opts: Options, device, log: Callable[[str], None]) -> dict[str, Any]:
    """``ceilings``, ``train`` and ``inference`` (whichever are selected), timed in one round-robin loop."""
    selected = set(opts.sections)
    jobs = ceiling_jobs(opts, device) if "ceilings" in selected else []
    if {"train", "inference"} & selected:
        jobs += model_jobs(opts, device, "train" in selected, "inference" in selected)
    with tf32_off():
        times = interleaved(jobs, opts.repeats, opts.min_run_time, log)
    out: dict[str, Any] = {}
    ceilings: dict[str, dict[str, Any]] = {}
    for job in (j for j in jobs if j.section == "ceilings"):
        rounds = times[job.name]
        ceilings[job.precision] = {"round_flops": [job.flops / statistics.median(r) for r in rounds]}
        out.setdefault("ceilings", []).append(throughput_row(job, rounds, None))
    if ceilings:
        out["ceilings_gflops"] = {r["precision"]: r["gflops"] for r in out["ceilings"]}
    for job in (j for j in jobs if j.section != "ceilings"):
        ceiling = ceilings.get("fp32" if job.precision == "fp32" else "bf16")
        out.setdefault(job.section, []).append(throughput_row(job, times[job.name], ceiling))
    return out
