"""The one training loop. Every task (translation, LM, MLM) gives it an `Objective`:
the batches, the loss and the validation.

`fit` runs a `Trainer` in the run directory `LoopConfig.out`. A training step, in the
order `Trainer.step` reads:

1. accumulate the gradients of `update_freq` batches (under torchrun: this process's
   share of the step's batches, with DDP's gradient exchange on the last one only);
2. divide them by the step's number of predictions, over every batch and process;
3. clip, take the optimiser step, advance the schedule;
4. every `log_every` steps, log the loss, lr and tokens/s; every `valid_every` steps,
   validate, checkpoint, and keep the best model at the top of the run directory.

Resume is exact: a checkpoint holds the optimiser, scheduler and RNG states (of every
process) and the step, and the batch of a step depends only on (seed, step).

Nothing is lost to a crash. A run killed (or failing) at any file operation resumes from
its newest checkpoint and logs what an uninterrupted run logs: `Trainer.run` first tidies
what interrupted saves left (`checkpoint.tidy_run`), drops log records after the
checkpoint, and puts the best model back in place if the crash came between a checkpoint
and the copy of its model to the top of the run directory (`Trainer.restore_best`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.text.tokenizer import Tokenizer
from transformer.training import checkpoint as ckpt
from transformer.store import modeldir
from transformer import files
from transformer.training import distributed
from transformer.training.optim import OptimConfig, make_optimizer
from transformer.device import cpu_contention, release_free_memory, resolve_precision

LOG = "log.jsonl"


@dataclass(frozen=True)
class LoopConfig:
    """What every task's training run shares: where, how long, how often, and the optimiser."""

    out: Path
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int | None = None
    max_minutes: float | None = None  # wall-clock time of the whole run, validation and resumes included
    update_freq: int = 1  # batches accumulated per optimiser step
    seed: int = 1
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where native: a CUDA GPU, an AVX-512-BF16/AMX CPU)
    device: str = "auto"
    valid_every: int = 1000  # steps between validations and checkpoints
    keep_last: int = 5  # checkpoints kept
    log_every: int = 50
    resume: bool = False
    progress: bool = True
    init: Path | None = None  # start from this model directory's weights and vocabulary (fine-tuning)
    freeze: str | None = None  # "embeddings", or N: the embeddings and the lowest N layers of each stack

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the optimiser as a nested dict; without `out`: where a run lives is no part of what it is."""
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "out"}, default=str))


@dataclass(frozen=True)
class Objective:
    """What a task gives the loop.

    batch(i): batch number i (0-based; optimiser step s uses batches s·F·W .. (s+1)·F·W - 1,
    F = update_freq, W = processes) on the device, a pure function of (seed, i).
    loss(model, batch): (summed loss, number of predictions).
    validate(model): metrics, `best_metric` among them (called in eval mode, without
    gradients, under autocast, on process 0 only).
    """

    batch: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]
    validate: Callable[[torch.nn.Module], dict[str, float]]
    best_metric: str
    higher_is_better: bool


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank `rank` > 0 starting at `step` when no saved RNG state fits it."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trim_log(path: Path, step: int) -> None:
    """Drop log records after `step` (written by a run that died after its last checkpoint)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):  # a line cut short by a kill
            continue
    trimmed = "".join(line + "\n" for line in kept)
    if trimmed != text:
        files.atomic_write_text(path, trimmed)


def _quiet(message: str) -> None:
    """`say` of the processes other than 0."""


class _LossModule(torch.nn.Module):
    """model + loss as one module, so that DDP sees the whole loss computation as its forward
    (the loss may call the model's submodules directly, as MLM's does)."""

    def __init__(self, model: torch.nn.Module, loss: Callable) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


class Trainer:
    """The state of a run in progress and its steps; `fit` makes one and runs it."""

    def __init__(self, cfg: LoopConfig, model: torch.nn.Module, model_cfg: ModelConfig, tokenizer: Tokenizer,
                 objective: Objective, world: distributed.Dist, meta: dict, say: Callable[[str], None],
                 optimizer: tuple | None = None) -> None:
        self.cfg, self.model, self.model_cfg, self.objective, self.world = cfg, model, model_cfg, objective, world
        self.say = say if world.main else _quiet
        self.device = self._place(model)
        self.precision, why = resolve_precision(cfg.precision, self.device)
        self.say(f"device {self.device}, precision {self.precision} ({why})" + (
            f"; {world.world_size} processes (DistributedDataParallel, {dist.get_backend()})" if world.active else ""))
        self.tokenizer_bytes = tokenizer.to_bytes()
        self._check_ranks_agree()
        self.optimizer, self.scheduler = optimizer or make_optimizer(model, cfg.optim)
        self.step, self.best, self.elapsed = 0, None, 0.0
        self.best_step: int | None = None  # the step of the best validation, whose model is at the top of the run
        self.meta = meta | ({"processes": world.world_size} if world.active else {})
        self.ddp = None
        if world.active:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _LossModule(model, objective.loss), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,  # the only buffers (sinusoid tables) never change
            )

    def _place(self, model: torch.nn.Module) -> torch.device:
        """The device of this process: under torchrun on CUDA, cuda:LOCAL_RANK (the model moves there)."""
        device = next(model.parameters()).device
        if self.world.active and device.type == "cuda" and device.index != torch.cuda.current_device():
            device = torch.device("cuda", torch.cuda.current_device())
            model.to(device)
        return device

    def _check_ranks_agree(self) -> None:
        if not self.world.active:  # every rank must train the same model with the same vocabulary
            return
        mine = (self.tokenizer_bytes, self.model_cfg.to_dict())
        everyone: list = [None] * self.world.world_size
        dist.all_gather_object(everyone, mine)
        if any(other != mine for other in everyone):
            raise UserError("the ranks built different tokenizers or model configs; train the vocabulary once "
                            "(one process), then `resume` from it")

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's training state, or seed a new run."""
        world, seed = self.world, self.cfg.seed
        if state is None:
            torch.manual_seed(seed if world.main else rank_seed(seed, world.rank, 0))
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.elapsed = state["step"], state["best"], state["elapsed_s"]
        self.best_step = state.get("best_step")  # None in checkpoints of older versions
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == world.world_size:
            _set_rng_state(ranks[world.rank])
        elif world.main:
            _set_rng_state(state["rng"])
        else:  # saved by a run with another number of processes
            torch.manual_seed(rank_seed(seed, world.rank, self.step))

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _accumulate(self) -> tuple[torch.Tensor, int]:
        """Backward over this step's batches: (summed loss, predictions), both over every process."""
        cfg, world = self.cfg, self.world
        loss_sum, n = torch.zeros((), device=self.device), 0
        if not world.active:
            for i in range(self.step * cfg.update_freq, (self.step + 1) * cfg.update_freq):
                with self.autocast():
                    batch_loss, batch_n = self.objective.loss(self.model, self.objective.batch(i))
                batch_loss.backward()
                loss_sum, n = loss_sum + batch_loss.detach(), n + batch_n
            return loss_sum, n
        numbers = distributed.shard(self.step, cfg.update_freq, world.world_size, world.rank)
        for k, i in enumerate(numbers):
            with contextlib.nullcontext() if k == len(numbers) - 1 else self.ddp.no_sync():
                with self.autocast():
                    batch_loss, batch_n = self.ddp(self.objective.batch(i))
                batch_loss.backward()  # DDP averages the gradients over the processes in the last one
            loss_sum, n = loss_sum + batch_loss.detach(), n + batch_n
        totals = torch.stack([loss_sum.double(), torch.tensor(float(n), dtype=torch.float64, device=self.device)])
        dist.all_reduce(totals)
        return totals[0], int(totals[1].item())

    def step_once(self) -> tuple[torch.Tensor, int, float]:
        """One optimiser step; returns the step's summed loss (a scalar tensor), its predictions, and its lr."""
        loss_total, n = self._accumulate()
        # Gradients hold the sum over the step's batches (DDP: that sum's mean over the W processes).
        divisor = max(n, 1) / (self.world.world_size if self.world.active else 1)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(divisor)
        if self.cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_total, n, lr

    def validate_and_checkpoint(self) -> None:
        """Validate (process 0), write a checkpoint with every process's RNG state, keep the best model."""
        world, out = self.world, Path(self.cfg.out)
        if world.main:
            self.model.eval()
            # on a CPU validation (loss and decoding) runs in fp32, as decoding does under `auto`:
            # autocast made the many small ops of a decoding step 4x slower there
            with torch.no_grad(), self.autocast() if self.device.type != "cpu" else contextlib.nullcontext():
                metrics = self.objective.validate(self.model)
            self.model.train()
        rng, rng_ranks = _rng_state(), None
        if world.active:  # also the barrier: the other processes wait here for process 0's validation
            rng_ranks = [None] * world.world_size
            dist.all_gather_object(rng_ranks, rng)
        if not world.main:
            return
        self.log({"kind": "valid", "step": self.step, **metrics, "elapsed_s": round(self.elapsed, 1)})
        self.say(f"step {self.step}: " + ", ".join(f"valid {k} {v:.4f}" for k, v in metrics.items())
                 + f" ({self.elapsed:.0f} s)")
        value = metrics[self.objective.best_metric]
        improved = self.best is None or (value > self.best if self.objective.higher_is_better else value < self.best)
        if improved:
            self.best, self.best_step = value, self.step
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "step": self.step, "best": self.best, "best_step": self.best_step, "elapsed_s": self.elapsed}
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        # The order matters (see `restore_best`): when this validation is the best, its checkpoint is the
        # newest one, which pruning keeps, until the copy of its model at the top of the run is complete.
        modeldir.save_model_dir(ckpt.checkpoint_dir(out, self.step), self.model, self.model_cfg, self.tokenizer_bytes,
                            state, self.meta)
        ckpt.prune_checkpoints(out, self.cfg.keep_last)
        if improved:
            modeldir.save_model_dir(out, self.model, self.model_cfg, self.tokenizer_bytes, meta=self._best_meta())

    def _best_meta(self) -> dict:
        return self.meta | {"best": {"step": self.best_step, self.objective.best_metric: self.best}}

    def restore_best(self) -> None:
        """Put the best model back at the top of the run directory if a crash kept it from getting there.

        A validation that improves writes its checkpoint (whose train state names it as
        `best_step`), prunes, then copies its model to the top; a run killed or failing in
        between resumes from that very checkpoint, the newest. Resuming, the top's
        config.json names another step (or the top holds no model yet): copy the model of
        checkpoint `best_step`, which is still there. It is, always: pruning keeps the newest
        checkpoint, and a later checkpoint is only written once the top holds the best model
        (this process copied it, or this method did at the start of the run). Process 0 only.
        """
        out = Path(self.cfg.out)
        if self.best_step is None:
            return
        meta = modeldir.read_meta(out)
        if meta is not None and (meta.get("best") or {}).get("step") == self.best_step:
            return
        source = ckpt.checkpoint_dir(out, self.best_step)
        if not source.is_dir():  # only when someone deleted it: the next improvement replaces the top
            self.say(f"warning: {out} does not hold the best model (step {self.best_step}) and its checkpoint "
                     f"is gone; the model there stays until the next better validation")
            return
        self.say(f"{out}: the best model (step {self.best_step}) was not in place; copied it from {source}")
        modeldir.copy_model_dir(source, out, self._best_meta())

    def log(self, record: dict) -> None:
        files.append_text(Path(self.cfg.out) / LOG, json.dumps(record) + "\n")

    def done(self) -> bool:
        cfg = self.cfg
        return (cfg.max_steps is not None and self.step >= cfg.max_steps) or (
            cfg.max_minutes is not None and self.elapsed >= 60 * cfg.max_minutes)

    def run(self) -> None:
        """Steps until `done`, then a last validation and checkpoint unless the last step had them."""
        cfg, world, out = self.cfg, self.world, Path(self.cfg.out)
        if world.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"{out}: cannot create: {e.strerror or e}") from None
            ckpt.tidy_run(out)  # what a killed or failed run left: its journals and temporaries
            _trim_log(out / LOG, self.step)
            self.restore_best()
            ckpt.prune_checkpoints(out, self.cfg.keep_last)  # a run killed before its last prune
        self.model.train()
        release_free_memory()  # what building the vocabulary and reading the data freed
        run_start = time.perf_counter() - self.elapsed  # wall-clock, validation included, across resumes
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", disable=not (cfg.progress and world.main),
                   dynamic_ncols=True)
        validated = self.step if ckpt.list_checkpoints(out) else None
        tokens, seconds, first, busy = 0, 0.0, (self.step, self.elapsed), False
        while not self.done():
            t0 = time.perf_counter()
            loss_total, n, lr = self.step_once()
            now = time.perf_counter()
            self.elapsed = self._agreed_clock(now - run_start)
            tokens, seconds = tokens + n, seconds + (now - t0)
            bar.total = self.expected_steps(*first)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == 1:
                if world.main:
                    loss = loss_total.item() / max(n, 1)
                    self.log({"kind": "train", "step": self.step, "loss": loss, "lr": lr,
                              "tokens_per_s": round(tokens / seconds, 1), "elapsed_s": round(self.elapsed, 1)})
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
                    busy = busy or self._warn_if_busy()
                tokens, seconds = 0, 0.0
            if self.step % cfg.valid_every == 0:
                self.validate_and_checkpoint()
                release_free_memory()  # what validation's decoding freed
                validated = self.step
        bar.close()
        if validated != self.step:
            self.validate_and_checkpoint()

    def expected_steps(self, start_step: int, start_elapsed: float) -> int | None:
        """The step this run will end at: `max_steps`, or sooner the steps that fit in `max_minutes` at the pace
        since (start_step, start_elapsed), validations included; None if neither bounds it."""
        cfg, done = self.cfg, self.step - start_step
        if cfg.max_minutes is None or done == 0:
            return cfg.max_steps
        pace = (self.elapsed - start_elapsed) / done  # seconds a step
        fit = self.step + max(0, int((60 * cfg.max_minutes - self.elapsed) / pace)) if pace > 0 else self.step
        return fit if cfg.max_steps is None else min(fit, cfg.max_steps)

    def _warn_if_busy(self) -> bool:
        """Say once why steps are slow when other processes oversubscribe a CPU; whether it said so."""
        if self.device.type != "cpu" or self.step < self.cfg.log_every:  # the 1-minute load lags at the start
            return False
        why = cpu_contention(torch.get_num_threads())
        if why is not None:
            self.say(f"warning: {why}")
        return why is not None

    def _agreed_clock(self, elapsed: float) -> float:
        """The run's wall-clock time; under torchrun with `max_minutes`, process 0's, so that all stop together."""
        if not (self.world.active and self.cfg.max_minutes is not None):
            return elapsed
        clock = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
        dist.broadcast(clock, 0)
        return float(clock.item())

    def close(self) -> None:
        """Let go of DDP (and with it of the process group) before `distributed.job` ends the group."""
        self.ddp = None


def fit(
    cfg: LoopConfig,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    objective: Objective,
    state: dict | None = None,
    meta: dict | None = None,
    say: Callable[[str], None] = print,
    optimizer: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler] | None = None,
) -> Path:
    """Train `model` in the run directory cfg.out, or continue it from `state`; returns cfg.out.

    The best model (by `objective.best_metric`) is written at the top of the run directory,
    the last `keep_last` checkpoints under checkpoints/. `cfg.optim` must be resolved
    (`OptimConfig.resolve`); the run's config.json records it, with `meta`. `optimizer`:
    (optimizer, scheduler) to use instead of the one `cfg.optim` makes.

    Under torchrun (W = WORLD_SIZE > 1 processes) the model is wrapped in
    DistributedDataParallel: process r takes the batches ≡ r (mod W) of every step
    (`distributed.shard`), and the gradient is still the mean over all the step's
    predictions. Process 0 validates, logs and checkpoints. A process that fails says why
    on stderr and exits at once, non-zero, so that torchrun stops the others
    (`distributed.job`).
    """
    meta = (meta or {}) | {"loop": cfg.to_dict()}
    with distributed.job(next(model.parameters()).device) as world:
        trainer = Trainer(cfg, model, model_cfg, tokenizer, objective, world, meta, say, optimizer)
        trainer.restore(state)
        trainer.run()
        trainer.close()
        if world.main:
            trainer.say(f"done: step {trainer.step}, {trainer.elapsed / 60:.1f} min; best valid "
                        f"{objective.best_metric} {trainer.best:.4f}; best model in {cfg.out}")
        del trainer
    return Path(cfg.out)
