"""Training a translation model with the paper's recipe (section 5).

Batches grouped by length up to `max_tokens`; label-smoothed cross-entropy (eps 0.1,
pad excluded); Adam (0.9, 0.98, 1e-9) with warm-up and inverse square-root decay;
gradient accumulation over `update_freq` batches. Every `valid_every` steps: validation
loss, perplexity and greedy BLEU, a checkpoint (the last `keep_last` are kept) and,
when BLEU improved, the best model at the top of the run directory.

Resume is exact: a checkpoint holds the optimiser, scheduler and RNG states and the
step, and the data of a step depends only on (seed, step).

`fit` is the one training loop; translation (`train`) and the language models
(`transformer.lm`, `transformer.mlm`) each give it their data, loss and validation.
Under torchrun it trains with DistributedDataParallel, each process on its share of
every step's batches (`transformer.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import ModelConfig
from .data import TokenBatchSampler, collate, encode_pairs, read_parallel
from .decode import SearchConfig
from .errors import UserError
from .evaluate import score
from .losses import label_smoothed_cross_entropy
from .models import EncoderDecoder, build_model
from .optim import make_optimizer, make_scheduler
from .tokenizer import Tokenizer
from .translate import resolve_device, translate_lines

LOG = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model's shape (that is `ModelConfig`)."""

    train_src: Path
    train_tgt: Path
    valid_src: Path
    valid_tgt: Path
    out: Path
    vocab_size: int = 8000  # joint BPE vocabulary
    tokenizer_type: str = "bpe"  # or "unigram"
    max_tokens: int = 4096  # per batch, padded (see data.TokenBatchSampler)
    update_freq: int = 1  # batches accumulated per optimiser step
    max_steps: int | None = None
    max_epochs: int | None = None
    max_minutes: float | None = None
    warmup: int = 4000
    lr_scale: float = 1.0
    label_smoothing: float = 0.1
    clip_norm: float | None = None
    seed: int = 1
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on a CUDA GPU that supports it, else fp32)
    device: str = "auto"
    valid_every: int = 1000  # steps between validations and checkpoints
    valid_bleu_lines: int | None = None  # decode only the first N validation lines for BLEU
    keep_last: int = 5
    log_every: int = 50
    resume: bool = False
    progress: bool = True


@dataclass
class Corpus:
    src: list[list[int]]
    tgt: list[list[int]]
    sampler: TokenBatchSampler
    src_text: list[str]
    tgt_text: list[str]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (a CUDA GPU with bf16, or a CPU with AVX-512-BF16/AMX).

    On CPUs without it, bf16 matmuls take a slow path: 40x slower than fp32 on an AVX2 CPU
    (BENCHMARKS.md).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """The precision to train in, and why: `auto` picks bf16 autocast on a GPU with native bf16, else fp32.

    CPUs get fp32 under `auto` even where bf16 is native (AVX-512-BF16/AMX): no such CPU was
    at hand to measure that bf16 pays there and trains as well, so it stays opt-in
    (`--precision bf16`); on CPUs without it, bf16 is about 40x slower (BENCHMARKS.md).
    """
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {name}: choose fp32, bf16 or auto")
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda" and native_bf16(device):
        return "bf16", "auto: the GPU has native bf16"
    if device.type == "cpu" and native_bf16(device):
        return "fp32", "auto: fp32 on CPUs; --precision bf16 uses this CPU's native bf16"
    return "fp32", f"auto: {device.type} has no native bf16"


def _load_corpus(
    src_path: Path, tgt_path: Path, tokenizer: Tokenizer, max_len: int, cfg: TrainConfig, shuffle: bool, say: Callable
) -> Corpus:
    pairs, skipped = read_parallel(src_path, tgt_path)
    if skipped:
        say(f"{src_path}: skipped {skipped} pair(s) with an empty side")
    src, tgt = encode_pairs(tokenizer, pairs, max_len, src_path, tgt_path)
    sampler = TokenBatchSampler(
        [len(s) for s in src], [len(t) for t in tgt], cfg.max_tokens, seed=cfg.seed, shuffle=shuffle
    )
    return Corpus(src, tgt, sampler, [p.src for p in pairs], [p.tgt for p in pairs])


class EpochBatches:
    """The i-th batch counting across epochs: epoch e's batches (seeded by e) follow epoch e-1's."""

    def __init__(self, sampler: TokenBatchSampler) -> None:
        self.sampler = sampler
        self.epoch, self.start, self.batches = 0, 0, sampler.batches(0)

    def __getitem__(self, i: int) -> list[int]:
        if i < self.start:  # only on a fresh lookup after a restart: walk again from epoch 0
            self.epoch, self.start, self.batches = 0, 0, self.sampler.batches(0)
        while i >= self.start + len(self.batches):
            self.epoch, self.start = self.epoch + 1, self.start + len(self.batches)
            self.batches = self.sampler.batches(self.epoch)
        return self.batches[i - self.start]

    def steps_in(self, epochs: int, update_freq: int) -> int:
        """Optimiser steps that the first `epochs` epochs make."""
        batches = sum(len(self.sampler.batches(e)) for e in range(epochs))
        return -(-batches // update_freq)


def _to_device(corpus: Corpus, idx: list[int], device: torch.device):
    """A collated batch on `device`; on CUDA through pinned memory, copied without blocking."""
    tensors = collate([corpus.src[i] for i in idx], [corpus.tgt[i] for i in idx])
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def validate(
    model: EncoderDecoder, tokenizer: Tokenizer, corpus: Corpus, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Validation loss, perplexity and greedy BLEU (`fit` calls it in eval mode, without gradients)."""
    loss_sum = nll_sum = n = 0.0
    for idx in corpus.sampler.batches(0):
        src, tgt_in, tgt_out = _to_device(corpus, idx, device)
        loss, nll, count = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, cfg.label_smoothing, model.cfg.pad_id)
        loss_sum, nll_sum, n = loss_sum + loss.item(), nll_sum + nll.item(), n + count.item()
    lines = cfg.valid_bleu_lines or len(corpus.src_text)
    hyps = translate_lines(model, tokenizer, corpus.src_text[:lines], SearchConfig(beam=1), batch_size=128)
    bleu = score(hyps, corpus.tgt_text[:lines]).bleu
    return {"loss": loss_sum / n, "nll": nll_sum / n, "ppl": math.exp(min(nll_sum / n, 50.0)), "bleu": bleu}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of rank `rank` > 0 starting at `step` when no saved RNG state fits it."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)


class _LossModule(torch.nn.Module):
    """model + loss_fn as one module, so that DDP sees the whole loss computation as its forward.

    loss_fn may call the model's submodules directly (as mlm's does); wrapped like this, DDP
    still hooks every parameter's gradient.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _quiet(message: str) -> None:
    """`say` of the ranks other than 0."""


def _trim_log(path: Path, step: int) -> None:
    """Drop log records after `step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a run in `cfg.out`; returns the run directory. The best model is at its top."""
    loop = LoopConfig(
        out=cfg.out, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, clip_norm=cfg.clip_norm,
        seed=cfg.seed, precision=cfg.precision, device=cfg.device, valid_every=cfg.valid_every,
        keep_last=cfg.keep_last, log_every=cfg.log_every, resume=cfg.resume, progress=cfg.progress,
        update_freq=cfg.update_freq,
    )
    distributed.bind_cuda_device()  # under torchrun: "cuda" is cuda:LOCAL_RANK
    device = resolve_device(cfg.device)
    world = distributed.env_world()
    if not world.main:
        say = _quiet
    resumed = open_run(loop, say)
    if resumed is not None:
        model, model_cfg, tokenizer, state = resumed
    else:
        state = None
        pairs, _ = read_parallel(cfg.train_src, cfg.train_tgt)
        say(f"training a {cfg.vocab_size}-token joint {cfg.tokenizer_type} vocabulary on {len(pairs)} pairs")
        tokenizer = Tokenizer.train(
            (s for p in pairs for s in (p.src, p.tgt)), cfg.vocab_size, model_type=cfg.tokenizer_type
        )
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size, pad_id=Tokenizer.PAD)
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg).to(device)
    if not isinstance(model, EncoderDecoder):
        raise UserError(f"translation training needs an encoder-decoder model, not arch {model_cfg.arch!r}")

    train_data = _load_corpus(cfg.train_src, cfg.train_tgt, tokenizer, model_cfg.max_len, cfg, True, say)
    valid_data = _load_corpus(cfg.valid_src, cfg.valid_tgt, tokenizer, model_cfg.max_len, cfg, False, say)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params:,} parameters; data: {len(train_data.src)} training, {len(valid_data.src)} validation pairs")
    batches = EpochBatches(train_data.sampler)
    if cfg.max_epochs is not None:
        epoch_steps = batches.steps_in(cfg.max_epochs, cfg.update_freq * world.world_size)
        loop = dataclasses.replace(loop, max_steps=min(loop.max_steps or epoch_steps, epoch_steps))
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, model_cfg.d_model, cfg.warmup, cfg.lr_scale)

    def batch_for_step(i: int):
        return _to_device(train_data, batches[i], device)

    def loss_fn(model: EncoderDecoder, batch) -> tuple[torch.Tensor, int]:
        src, tgt_in, tgt_out = batch
        loss, _, n = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, cfg.label_smoothing, model_cfg.pad_id)
        return loss, int(n)

    meta = {"train": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}}
    return fit(
        loop, model, model_cfg, tokenizer, batch_for_step, loss_fn,
        lambda m: validate(m, tokenizer, valid_data, cfg, device), "bleu", True, state, meta, say,
        optim=(optimizer, scheduler),
    )


# ---------------------------------------------------------------------------------------
# Shared machinery for the language models (`transformer.lm`, `transformer.mlm`).
#
# The loop below is the translation loop's machinery without its data specifics: progress
# bar, JSON-lines log, atomic checkpoints (the run directory laid out as for translation),
# the best model at the top of the run directory, exact resume, bf16 autocast, stopping
# after max steps or minutes. The data of optimiser step s is a pure function of
# (seed, s), so a checkpoint needs only the step besides the optimiser, scheduler and RNG
# states.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """The options of `fit` that every language-model trainer shares."""

    out: Path
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | constant | inverse-sqrt
    warmup: int = 100  # linear warm-up steps
    decay_steps: int | None = None  # cosine: steps to reach min_lr (default: max_steps, else 5000)
    min_lr: float | None = None  # cosine floor (default: lr / 10)
    weight_decay: float = 0.1  # AdamW, on matrices only
    beta2: float = 0.99
    clip_norm: float | None = 1.0
    update_freq: int = 1  # batches accumulated per optimiser step
    seed: int = 1
    precision: str = "auto"
    device: str = "auto"
    valid_every: int = 250
    keep_last: int = 3
    log_every: int = 50
    resume: bool = False
    progress: bool = True


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Multiplier of cfg.lr for optimiser update number `step` (1-based).

    Linear warm-up over cfg.warmup steps, then: constant; cosine decay to min_lr at
    decay_steps (constant after); or the paper's inverse square root (lr at the end of warm-up).
    """
    warmup = max(cfg.warmup, 0)
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse-sqrt":
        return math.sqrt(max(warmup, 1) / step)
    if cfg.schedule == "cosine":
        total = cfg.decay_steps or cfg.max_steps or 5000
        floor = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise UserError(f"--schedule {cfg.schedule}: choose cosine, constant or inverse-sqrt")


def make_adamw(model: torch.nn.Module, cfg: LoopConfig):
    """AdamW (beta1 0.9, beta2 cfg.beta2), weight decay on matrices only, and its lr schedule."""
    if cfg.schedule not in ("cosine", "constant", "inverse-sqrt"):
        raise UserError(f"--schedule {cfg.schedule}: choose cosine, constant or inverse-sqrt")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type == "cuda" for p in params)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=fused or None, foreach=None if fused else True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, cfg))
    return optimizer, scheduler


def open_run(cfg: LoopConfig, say: Callable[[str], None]):
    """(model, model config, tokenizer, train state) of the newest checkpoint when resuming, else None.

    Refuses to start a new run over an existing one.
    """
    checkpoints = ckpt.list_checkpoints(cfg.out)
    if checkpoints and not cfg.resume:
        raise UserError(f"{cfg.out} already holds a training run; pass --resume to continue it, or choose another --out")
    if cfg.resume and checkpoints:
        latest = checkpoints[-1]
        model, model_cfg, tokenizer, _ = ckpt.load_model_dir(latest, resolve_device(cfg.device))
        state = ckpt.load_train_state(latest)
        if state is None:
            raise UserError(f"{latest}: checkpoint has no training state to resume from")
        say(f"resuming from {latest} (step {state['step']})")
        return model, model_cfg, tokenizer, state
    if cfg.resume:
        say(f"{cfg.out}: no checkpoint to resume from; starting a new run")
    return None


def fit(
    cfg: LoopConfig,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    batch_for_step: Callable[[int], object],
    loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, int]],
    validate_fn: Callable[[torch.nn.Module], dict[str, float]],
    best_metric: str,
    higher_is_better: bool,
    state: dict | None = None,
    meta: dict | None = None,
    say: Callable[[str], None] = print,
    optim: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler] | None = None,
) -> Path:
    """Train `model` in the run directory cfg.out; returns it. The best model is at its top.

    batch_for_step(i): batch number i (0-based; optimiser step s uses batches
    s·update_freq .. (s+1)·update_freq - 1) on the device, a pure function of (seed, i).
    loss_fn(model, batch): (summed loss, number of predictions); the gradient of a step is
    that of its summed loss over its number of predictions. validate_fn(model): metrics
    (called in eval mode, without gradients, under autocast), `best_metric` among them.
    `optim`: (optimizer, scheduler); by default AdamW and the schedule of `cfg`.

    Under torchrun (W = WORLD_SIZE > 1 processes) the model is wrapped in
    DistributedDataParallel: step s uses batches s·update_freq·W .. (s+1)·update_freq·W - 1,
    rank r those ≡ r (mod W) (`distributed.shard`), and the gradient is still the mean over
    all the step's predictions on all ranks. Rank 0 validates, logs and checkpoints; the
    checkpoint holds every rank's RNG state. A rank that fails says why on stderr and its
    process exits at once, non-zero, so that torchrun stops the others (`distributed.job`).
    """
    with distributed.job(next(model.parameters()).device) as world:
        out = Path(cfg.out)
        device = next(model.parameters()).device
        if world.active and device.type == "cuda" and device.index != torch.cuda.current_device():
            if optim is not None:
                raise UserError(f"rank {world.rank}: the model is on {device}, not on cuda:{torch.cuda.current_device()}")
            device = torch.device("cuda", torch.cuda.current_device())
            model.to(device)
        if not world.main:
            say = _quiet
        precision, why = resolve_precision(cfg.precision, device)
        say(f"device {device}, precision {precision} ({why})"
            + (f"; {world.world_size} processes (DistributedDataParallel, {dist.get_backend()})" if world.active else ""))
        tokenizer_bytes = tokenizer.to_bytes()
        if world.active:  # every rank must train the same model with the same vocabulary
            mine = (tokenizer_bytes, model_cfg.to_dict())
            everyone: list = [None] * world.world_size
            dist.all_gather_object(everyone, mine)
            if any(other != mine for other in everyone):
                raise UserError("the ranks built different tokenizers or model configs; train the vocabulary once "
                                "(one process), then --resume from it")
        optimizer, scheduler = optim or make_adamw(model, cfg)
        step, best, elapsed = 0, None, 0.0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, best, elapsed = state["step"], state["best"], state["elapsed_s"]
            ranks = state.get("rng_ranks")
            if ranks is not None and len(ranks) == world.world_size:
                _set_rng_state(ranks[world.rank])
            elif world.main:
                _set_rng_state(state["rng"])
            else:  # saved by a run with another number of processes
                torch.manual_seed(rank_seed(cfg.seed, world.rank, step))
        else:
            torch.manual_seed(cfg.seed if world.main else rank_seed(cfg.seed, world.rank, 0))
        log_path = out / LOG
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
            _trim_log(log_path, step)
        meta = (meta or {}) | {"loop": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}}
        if world.active:
            meta = meta | {"processes": world.world_size}
            ddp = torch.nn.parallel.DistributedDataParallel(
                _LossModule(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # the only buffers (sinusoid tables) never change
            )

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

        def log(record: dict) -> None:
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        def checkpoint_and_validate() -> None:
            nonlocal best
            if world.main:
                model.eval()
                with torch.no_grad(), autocast():
                    metrics = validate_fn(model)
                model.train()
            rng = _rng_state()
            rng_ranks = None
            if world.active:  # also the barrier: the other ranks wait here for rank 0's validation
                rng_ranks = [None] * world.world_size
                dist.all_gather_object(rng_ranks, rng)
            if not world.main:
                return
            log({"kind": "valid", "step": step, **metrics, "elapsed_s": round(elapsed, 1)})
            say(f"step {step}: " + ", ".join(f"valid {k} {v:.4f}" for k, v in metrics.items()) + f" ({elapsed:.0f} s)")
            value = metrics[best_metric]
            improved = best is None or (value > best if higher_is_better else value < best)
            best = value if improved else best
            train_state = {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "step": step, "best": best, "elapsed_s": elapsed,
            }
            if rng_ranks is not None:
                train_state["rng_ranks"] = rng_ranks
            ckpt.save_model_dir(ckpt.checkpoint_dir(out, step), model, model_cfg, tokenizer_bytes, train_state, meta)
            ckpt.prune_checkpoints(out, cfg.keep_last)
            if improved:
                best_meta = meta | {"best": {"step": step, best_metric: value}}
                ckpt.save_model_dir(out, model, model_cfg, tokenizer_bytes, meta=best_meta)

        def done() -> bool:
            return (cfg.max_steps is not None and step >= cfg.max_steps) or (
                cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes
            )

        model.train()
        run_start = time.perf_counter() - elapsed  # wall-clock, validation included, across resumes
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not (cfg.progress and world.main),
                   dynamic_ncols=True)
        last_validated = step
        checkpointed = state is not None or bool(ckpt.list_checkpoints(out))
        tokens_since, time_since = 0, 0.0
        while not done():
            t0 = time.perf_counter()
            loss_sum, n = torch.zeros((), device=device), 0
            if world.active:
                numbers = distributed.shard(step, cfg.update_freq, world.world_size, world.rank)
                for k, i in enumerate(numbers):
                    last = k == len(numbers) - 1
                    with contextlib.nullcontext() if last else ddp.no_sync():
                        with autocast():
                            batch_loss, batch_n = ddp(batch_for_step(i))
                        batch_loss.backward()  # DDP averages the gradients over the ranks in the last one
                    loss_sum, n = loss_sum + batch_loss.detach(), n + batch_n
                totals = torch.stack([loss_sum.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
                dist.all_reduce(totals)
                loss_total, n = totals[0], int(totals[1].item())
                # The gradients hold (sum over ranks of the summed-loss gradients) / W.
                divisor = max(n, 1) / world.world_size
            else:
                for i in range(step * cfg.update_freq, (step + 1) * cfg.update_freq):
                    with autocast():
                        batch_loss, batch_n = loss_fn(model, batch_for_step(i))
                    batch_loss.backward()
                    loss_sum, n = loss_sum + batch_loss.detach(), n + batch_n
                loss_total, divisor = loss_sum, max(n, 1)
            for p in model.parameters():  # mean over the step's predictions, however many batches and ranks
                if p.grad is not None:
                    p.grad.div_(divisor)
            if cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            elapsed = now - run_start
            if world.active and cfg.max_minutes is not None:  # every rank stops at the same step: rank 0's clock
                clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
                dist.broadcast(clock, 0)
                elapsed = float(clock.item())
            tokens_since, time_since = tokens_since + n, time_since + (now - t0)
            bar.update(1)
            if world.main and (step % cfg.log_every == 0 or step == 1):
                loss = loss_total.item() / max(n, 1)
                log({"kind": "train", "step": step, "loss": loss, "lr": lr,
                     "tokens_per_s": round(tokens_since / time_since, 1), "elapsed_s": round(elapsed, 1)})
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_since / time_since:.0f}")
            if step % cfg.log_every == 0 or step == 1:
                tokens_since, time_since = 0, 0.0
            if step % cfg.valid_every == 0:
                checkpoint_and_validate()
                last_validated, checkpointed = step, True
        bar.close()
        if last_validated != step or not checkpointed:
            checkpoint_and_validate()
        ddp = None  # DDP lets go of the process group before `job` ends it (the others wait there for rank 0)
        if world.main:
            say(f"done: step {step}, {elapsed / 60:.1f} min; best valid {best_metric} {best:.4f}; best model in {out}")
        return out
