"""``vit-repro bench``: what the study costs on this machine, measured against the machine's ceilings.

Sections (``--sections``; all by default), each timed with ``torch.utils.benchmark.Timer`` (it synchronises
accelerators, sets the thread count and separates a warm-up call from the timed ones):

1. ``ceilings``: float32 (TF32 off) and bfloat16 matmul GFLOP/s, timed **in the same round-robin loop** as
   the ``train`` and ``inference`` jobs, so the fraction of the ceiling each model reaches is taken round by
   round against the ceiling measured under the same load.
2. ``train``: a ViT training step (default B/16, batch 32, 224 px; Adam, cross-entropy) of ours,
   torchvision's and, when installed, timm's, float32 and bf16 autocast; GFLOP/s from ``models.forward_macs``
   (a step counts 3 forward passes, a MAC 2 FLOPs).
3. ``inference``: forward passes of the same models (feature extraction), ours also with bf16 weights.
4. ``study``: the numbers the time estimates come from (``vit_repro.plan``): for every distinct (model,
   image size, precision) of the scratch arms of every study in params.yaml, training img/s (the arm's batch,
   augmentation and optimizer) and evaluation img/s; every study backbone's feature img/s; one frozen head
   run and one probe run.
5. ``frozen``: all frozen runs of the recipe grid (``--targets``: 8 recipes x 20 seeds) under a real
   ``dvc repro`` from cached features, against one feature pass under ``dvc repro`` too, in a temporary copy
   of ``--repo``; and the seed notebook's approach (the whole backbone forward every epoch), extrapolated.
6. ``data``: one epoch of the decoded-tensor loader against decoding the JPEGs every epoch.
7. ``dvc``: ``dvc repro`` with nothing to do.

The issue's targets and the frozen grid live with the benchmark (``benchmarks/targets.yaml``), not here: this
module only computes the metrics that a targets file names. ``--out X.json`` writes the results (with the
date, hardware, versions and ``machine_key``) and ``X.md``, the same tables as printed.

The package's modules: ``options`` (constants, ``Options``, ``BenchError``), ``cli`` (argument parsing and
``main``), ``targets``, ``timing``, ``throughput`` (ceilings, train, inference), ``study``, ``repo`` (the project
under test: its inputs, copying it, running commands in it), ``frozen``, ``data`` (data and dvc), ``run``
(running the sections) and ``output`` (the Markdown tables).
"""

from __future__ import annotations

from .cli import build_parser, main, parse_options
from .data import data_section, dvc_noop
from .frozen import frozen_section, grid_params
from .options import (FORMAT, IMPLEMENTATIONS, NUM_CLASSES, PRECISIONS, SECTIONS, TRAIN_STEP_FLOPS_PER_FORWARD,
                      BenchError, Options)
from .output import render, write_results
from .repo import COPIED_OUTPUTS, NOT_COPIED, _env, copy_repo, missing_inputs
from .run import environment, run_benchmark
from .study import (load_studies, measure_features, measure_frozen_runs, measure_scratch, scratch_keys, study_section,
                    synthetic_features)
from .targets import METRICS, Grid, Metric, Targets, evaluate_targets, load_targets
from .throughput import (build_implementation, ceiling_jobs, forward_gmacs, model_jobs, native_bf16, precisions_for,
                         throughput_sections)
from .timing import Job, interleaved, measure, tf32_off, throughput_row, timer

__all__ = [
    "COPIED_OUTPUTS", "FORMAT", "IMPLEMENTATIONS", "METRICS", "NOT_COPIED", "NUM_CLASSES", "PRECISIONS", "SECTIONS",
    "TRAIN_STEP_FLOPS_PER_FORWARD", "_env", "BenchError", "Grid", "Job", "Metric", "Options", "Targets", "build_implementation",
    "build_parser", "ceiling_jobs", "copy_repo", "data_section", "dvc_noop", "environment", "evaluate_targets",
    "forward_gmacs", "frozen_section", "grid_params", "interleaved", "load_studies", "load_targets", "main",
    "measure", "measure_features", "measure_frozen_runs", "measure_scratch", "missing_inputs", "model_jobs",
    "native_bf16", "parse_options", "precisions_for", "render", "run_benchmark", "scratch_keys", "study_section",
    "synthetic_features", "tf32_off", "throughput_row", "throughput_sections", "timer", "write_results",
]
