"""Training and evaluation: ``fit`` (the loop every arm shares), ``evaluate`` (per image), ``fit_logistic``.

Nothing here talks to MLflow or writes outputs: ``fit`` returns the history (``Hooks`` lets a caller
watch it), ``evaluate`` the per-image predictions. ``Trainer.step`` is the one training step.

Scaling out: under ``torchrun`` every process runs ``fit`` (DistributedDataParallel, gloo on CPU,
nccl on CUDA). ``train.batch_size`` is the global batch: every process draws the same global
permutation and trains on its own contiguous slice of each batch, so an optimisation step sees the
same images whatever the number of processes; ``train.grad_accum_steps`` micro-batches make one step.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .config import TrainConfig
from .devices import autocast
from .distributed import all_gather, all_reduce_sum, per_process_batch, rank_and_world
from .images import Augment, make_loader
from .schedule import Schedule

ToInput = Callable[[torch.Tensor], torch.Tensor]  # stored tensors (uint8 pixels, features) -> model input
Data = tuple[torch.Tensor, torch.Tensor]  # inputs, labels


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay (``adam``) or decoupled weight decay (``adamw``)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg.optimizer)
    if cls is None:
        raise ValueError(f"fit trains with adam or adamw, not {cfg.optimizer!r} (see fit_logistic)")
    return cls(params, lr=cfg.effective_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)


@dataclass
class Evaluation:
    """Per-image results on one image set: the true class, the predicted class and the loss of every image."""

    labels: torch.Tensor  # int64 [N]
    predictions: torch.Tensor  # int64 [N]
    losses: torch.Tensor  # float64 [N]: cross-entropy of each image
    num_classes: int

    @property
    def total(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> int:
        return int((self.predictions == self.labels).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def loss(self) -> float:
        return float(self.losses.mean())

    @property
    def confusion(self) -> torch.Tensor:
        """Counts, rows the true class, columns the predicted class."""
        k = self.num_classes
        return torch.bincount(self.labels * k + self.predictions, minlength=k * k).view(k, k)

    @property
    def recall(self) -> list[float]:
        """Accuracy within each true class (NaN for a class with no image)."""
        cm = self.confusion
        return [float(cm[i, i] / cm[i].sum()) if cm[i].sum() else math.nan for i in range(self.num_classes)]

    @property
    def balanced_accuracy(self) -> float:
        """Mean per-class recall over the classes present: 1/k for a model that predicts one class."""
        present = [r for r in self.recall if r == r]
        return sum(present) / len(present)

    @property
    def predicted_classes(self) -> int:
        return int(self.predictions.unique().numel())


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, to_input: ToInput, device: torch.device, num_classes: int,
             precision: str = "fp32", batch_size: int = 64) -> Evaluation:
    """Every image's prediction and loss. Under torchrun each process takes a contiguous shard."""
    rank, world = rank_and_world()
    inputs, labels = data[0].tensor_split(world)[rank], data[1].tensor_split(world)[rank]
    was_training = model.training
    model.eval()
    predictions, losses = [], []
    for start in range(0, len(inputs), batch_size):
        x = to_input(inputs[start : start + batch_size].to(device, non_blocking=True))
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none").double().cpu())
        predictions.append(logits.argmax(1).cpu())
    model.train(was_training)
    pred = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    loss = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
    if world > 1:
        pred, loss = (torch.cat(parts) for parts in zip(*all_gather((pred, loss))))
    return Evaluation(data[1].cpu(), pred, loss, num_classes)


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass(frozen=True)
class Task:
    """What a model trains on: the training data, the data watched for curves, and how stored tensors become inputs."""

    train: Data
    watch: Data  # evaluated every ``eval_every`` epochs and after the last; nothing it gives is used for training
    to_input: ToInput
    num_classes: int
    augment: Augment | None = None  # applied to each training micro-batch (uint8 pixels) before ``to_input``


@dataclass
class Hooks:
    """What ``fit`` tells and saves on the way; none of it changes a number."""

    on_epoch: Callable[[History], None] | None = None  # after each epoch, once its checkpoint is saved
    checkpoint: Checkpoint | None = None  # the training state is saved there after every epoch
    resume: dict[str, Any] | None = None  # a state saved so, to go on from
    progress: bool = False  # a progress bar and a line per epoch on a terminal
    desc: str = "train"


class Trainer:
    """One model's optimiser and step. ``step`` is the training step: ``fit`` loops it, the benchmark times it."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, to_input: ToInput,
                 augment: Augment | None = None) -> None:
        self.model, self.net, self.cfg, self.device, self.to_input, self.augment = model, model, cfg, device, to_input, augment
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.rank, self.world = rank_and_world()
        model.to(device).train()

    def distribute(self) -> None:
        """Under torchrun: gradients all-reduced in place, in DDP's buckets."""
        if self.world > 1 and self.params:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True)
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    def step(self, micro_batches: list[Data], images: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step over global micro-batches holding ``images`` images; its gradient is the mean
        over them, whatever the number of processes. Returns (loss sum, correct, images) over all processes,
        and the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i, (inputs, labels) in enumerate(micro_batches):
            if self.augment is not None:
                inputs = self.augment(inputs)
            # this process's contiguous slice of the global micro-batch (may be empty for a short last batch)
            inputs, labels = inputs.tensor_split(self.world)[self.rank], labels.tensor_split(self.world)[self.rank]
            x, y = self.to_input(inputs.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)
            last = i + 1 == len(micro_batches)
            with nullcontext() if last or self.net is self.model else self.net.no_sync():  # one all-reduce per step
                with autocast(self.device, self.cfg.precision):
                    logits = self.net(x)
                loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
                # DDP averages gradients over processes, so x world: the mean over the step's images
                (loss_sum * (self.world / images)).backward()
            sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
        # the norm before clipping is logged for every recipe: the evidence for or against clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm or math.inf)
        self.optimizer.step()
        return all_reduce_sum(sums), grad_norm


def fit(model: nn.Module, task: Task, cfg: TrainConfig, schedule: Schedule, seed: int, device: torch.device,
        hooks: Hooks | None = None) -> History:
    """Train the parameters of ``model`` that require grad for ``schedule``; evaluate ``task.watch`` now and then.

    One optimisation step = ``cfg.grad_accum_steps`` global micro-batches of ``cfg.batch_size`` images.
    """
    hooks = hooks or Hooks()
    rank, world = rank_and_world()
    per_process_batch(cfg.batch_size, world)
    loader = make_loader(task.train[0], task.train[1], cfg.batch_size, shuffle=True, seed=seed,
                         pin_memory=device.type == "cuda", drop_last=cfg.drop_last)
    trainer = Trainer(model, cfg, device, task.to_input, task.augment)
    if rank > 0:  # rank 0 keeps the single-process random stream (dropout); the others get their own
        torch.manual_seed(seed + 1_000_003 * rank)
    history, first_epoch, step = History(), 1, 0
    if hooks.resume is not None:
        history, first_epoch, step = _restore(hooks.resume, trainer, loader.generator, rank)
    trainer.distribute()
    bar = tqdm(total=schedule.total_steps, initial=step, desc=hooks.desc, unit="step", dynamic_ncols=True,
               disable=not hooks.progress or rank > 0 or not sys.stderr.isatty())
    for epoch in range(first_epoch, schedule.epochs + 1):
        started = time.perf_counter()
        sums, step, lr = _epoch(trainer, loader, schedule, epoch, step, history, bar)
        history.train_seconds += time.perf_counter() - started
        row = _epoch_row(trainer, task, schedule, epoch, sums, lr)
        row["epoch_time_s"] = time.perf_counter() - started
        history.epochs.append(row)
        if rank == 0 and hooks.progress:
            bar.write(_epoch_line(hooks.desc, epoch, schedule.epochs, row), file=sys.stderr)
        if hooks.checkpoint is not None:  # before on_epoch: a tracking server that fails now loses no epoch
            state = _training_state(trainer, loader.generator, history, epoch, step)
            if rank == 0:
                hooks.checkpoint.save(state)
        if hooks.on_epoch is not None:
            hooks.on_epoch(history)
    bar.close()
    return history


def _epoch(trainer: Trainer, loader, schedule: Schedule, epoch: int, step: int, history: History,
           bar) -> tuple[torch.Tensor, int, float]:
    """One pass over the loader; appends each step to ``history``. Returns the epoch's sums, the next step, the lr."""
    batch_size, accum, micro_batches = trainer.cfg.batch_size, trainer.cfg.grad_accum_steps, len(loader)
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)  # loss sum, correct, images: all processes
    batches, lr = iter(loader), math.nan
    for first in range(0, micro_batches, accum):
        group = [next(batches) for _ in range(min(accum, micro_batches - first))]
        images = min(batch_size * accum, (micro_batches - first) * batch_size, schedule.images - first * batch_size)
        lr = schedule.lr(step)
        sums, grad_norm = trainer.step(group, images, lr)
        epoch_sums += sums
        loss = sums[0].item() / sums[2].item()
        history.steps.append({"step": step, "epoch": epoch, "lr": lr, "loss": loss, "grad_norm": grad_norm.item(),
                              "images": int(sums[2].item())})
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
    return epoch_sums, step, lr


def _epoch_row(trainer: Trainer, task: Task, schedule: Schedule, epoch: int, sums: torch.Tensor,
               lr: float) -> dict[str, float]:
    seen = sums[2].item()
    row = {"epoch": epoch, "train_loss": sums[0].item() / seen, "train_acc": sums[1].item() / seen,
           "test_loss": math.nan, "test_acc": math.nan, "test_balanced_acc": math.nan, "lr": lr}
    if epoch % trainer.cfg.eval_every == 0 or epoch == schedule.epochs:
        ev = evaluate(trainer.model, task.watch, task.to_input, trainer.device, task.num_classes, trainer.cfg.precision)
        row |= {"test_loss": ev.loss, "test_acc": ev.accuracy, "test_balanced_acc": ev.balanced_accuracy}
    return row


def _epoch_line(desc: str, epoch: int, epochs: int, row: dict[str, float]) -> str:
    tested = "" if row["test_acc"] != row["test_acc"] else (
        f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.3f} bal {row['test_balanced_acc']:.3f}")
    return (f"{desc} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}{tested} | "
            f"{row['epoch_time_s']:.1f}s")


def _training_state(trainer: Trainer, generator: torch.Generator, history: History, epoch: int,
                    step: int) -> dict[str, Any]:
    """What ``fit`` needs to go on after ``epoch`` exactly as if never stopped (collective: every process calls it)."""
    device, augment = trainer.device, trainer.augment
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    rng = all_gather((torch.get_rng_state(), cuda))  # dropout draws: one stream per process
    return {
        "epoch": epoch,
        "step": step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "history": asdict(history),
        "rng": {"torch": [r[0] for r in rng], "cuda": [r[1] for r in rng], "loader": generator.get_state(),
                "augment": augment.generator.get_state() if augment is not None else torch.empty(0, dtype=torch.uint8)},
    }


def _restore(state: dict[str, Any], trainer: Trainer, generator: torch.Generator, rank: int) -> tuple[History, int, int]:
    """Load a saved state into the model, optimizer and random generators; return (history, next epoch, step)."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"]["loader"])
    if trainer.augment is not None:
        trainer.augment.generator.set_state(state["rng"]["augment"])
    if rank < len(state["rng"]["torch"]):  # else: resumed with more processes than saved it
        torch.set_rng_state(state["rng"]["torch"][rank])
        if trainer.device.type == "cuda" and len(state["rng"]["cuda"][rank]):
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], trainer.device)
    return History(**state["history"]), state["epoch"] + 1, state["step"]


def fit_logistic(train: Data, validation: Data, fit_part: Data, grid: tuple[float, ...], num_classes: int,
                 max_iter: int = 10000) -> tuple[nn.Linear, dict[str, Any]]:
    """A multinomial logistic regression on features, trained to convergence (scikit-learn, L-BFGS).

    The inverse L2 strength ``C`` is chosen from ``grid`` by validation log-loss, fitting on ``fit_part``
    and scoring on ``validation`` (both carved from the training set); the chosen model is then refitted
    on all of ``train``. Returns it as a ``nn.Linear`` (so it evaluates like any head) and the search.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from threadpoolctl import threadpool_limits

    def model(c: float, data: Data) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=max_iter, tol=1e-6).fit(data[0].double().numpy(), data[1].numpy())

    with threadpool_limits(1):  # like the other frozen runs: one thread, the same numbers on any CPU
        scores = {c: log_loss(validation[1].numpy(), model(c, fit_part).predict_proba(validation[0].double().numpy()),
                              labels=list(range(num_classes))) for c in grid}
        best = min(grid, key=lambda c: (scores[c], c))
        final = model(best, train)
    head = nn.Linear(train[0].shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(final.coef_))
        head.bias.copy_(torch.from_numpy(final.intercept_))
    search = {"C": best, "validation_log_loss": {str(c): s for c, s in scores.items()}, "iterations": int(final.n_iter_[0])}
    return head, search
