"""Training a translation model with the paper's recipe (section 5).

Batches grouped by length up to `max_tokens`; label-smoothed cross-entropy (eps 0.1,
pad excluded); Adam (0.9, 0.98, 1e-9) with warm-up and inverse square-root decay;
gradient accumulation over `update_freq` batches. Every `valid_every` steps: validation
loss, perplexity and greedy BLEU, a checkpoint (the last `keep_last` are kept) and,
when BLEU improved, the best model at the top of the run directory.

Resume is exact: a checkpoint holds the optimiser, scheduler and RNG states and the
position in the data (epoch, batch), and batch order depends only on (seed, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
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
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on a CUDA GPU that supports it)
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


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {name}: choose fp32, bf16 or auto")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


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


def _micro_batches(corpus: Corpus, epoch: int, start: int, update_freq: int) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (next position, the index lists of one optimiser step) through one epoch from `start`."""
    batches = corpus.sampler.batches(epoch)
    for i in range(start, len(batches), update_freq):
        yield i + update_freq, batches[i : i + update_freq]


def _to_device(corpus: Corpus, idx: list[int], device: torch.device):
    src, tgt_in, tgt_out = collate([corpus.src[i] for i in idx], [corpus.tgt[i] for i in idx])
    return src.to(device), tgt_in.to(device), tgt_out.to(device)


@torch.no_grad()
def validate(
    model: EncoderDecoder, tokenizer: Tokenizer, corpus: Corpus, cfg: TrainConfig, device: torch.device, autocast
) -> dict[str, float]:
    """Validation loss, perplexity and greedy BLEU."""
    model.eval()
    loss_sum = nll_sum = n = 0.0
    for idx in corpus.sampler.batches(0):
        src, tgt_in, tgt_out = _to_device(corpus, idx, device)
        with autocast():
            logits = model(src, tgt_in)
        loss, nll, count = label_smoothed_cross_entropy(logits, tgt_out, cfg.label_smoothing, model.cfg.pad_id)
        loss_sum, nll_sum, n = loss_sum + loss.item(), nll_sum + nll.item(), n + count.item()
    lines = cfg.valid_bleu_lines or len(corpus.src_text)
    with autocast():
        hyps = translate_lines(model, tokenizer, corpus.src_text[:lines], SearchConfig(beam=1), batch_size=128)
    bleu = score(hyps, corpus.tgt_text[:lines]).bleu
    model.train()
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
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    say(f"device {device}, precision {precision}")
    checkpoints = ckpt.list_checkpoints(out)
    if checkpoints and not cfg.resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")

    state = None
    if cfg.resume and checkpoints:
        latest = checkpoints[-1]
        model, model_cfg, tokenizer, _ = ckpt.load_model_dir(latest, device)
        state = ckpt.load_train_state(latest)
        if state is None:
            raise UserError(f"{latest}: checkpoint has no training state to resume from")
        say(f"resuming from {latest} (step {state['step']})")
    else:
        if cfg.resume:
            say(f"{out}: no checkpoint to resume from; starting a new run")
        torch.manual_seed(cfg.seed)
        pairs, _ = read_parallel(cfg.train_src, cfg.train_tgt)
        say(f"training a {cfg.vocab_size}-token joint {cfg.tokenizer_type} vocabulary on {len(pairs)} pairs")
        tokenizer = Tokenizer.train(
            (s for p in pairs for s in (p.src, p.tgt)), cfg.vocab_size, model_type=cfg.tokenizer_type
        )
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size, pad_id=Tokenizer.PAD)
        model = build_model(model_cfg).to(device)
    if not isinstance(model, EncoderDecoder):
        raise UserError(f"translation training needs an encoder-decoder model, not arch {model_cfg.arch!r}")
    tokenizer_bytes = tokenizer.to_bytes()

    train_data = _load_corpus(cfg.train_src, cfg.train_tgt, tokenizer, model_cfg.max_len, cfg, True, say)
    valid_data = _load_corpus(cfg.valid_src, cfg.valid_tgt, tokenizer, model_cfg.max_len, cfg, False, say)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params:,} parameters; data: {len(train_data.src)} training, {len(valid_data.src)} validation pairs")

    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, model_cfg.d_model, cfg.warmup, cfg.lr_scale)
    step, epoch, position, best_bleu, elapsed = 0, 0, 0, -1.0, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        best_bleu, elapsed = state["best_bleu"], state["elapsed_s"]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    _trim_log(log_path, step)
    meta = {"train": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}}

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def log(record: dict) -> None:
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_and_validate() -> None:
        nonlocal best_bleu
        metrics = validate(model, tokenizer, valid_data, cfg, device, autocast)
        record = {"kind": "valid", "step": step, "epoch": epoch, **metrics, "elapsed_s": round(elapsed, 1)}
        log(record)
        say(f"step {step}: valid loss {metrics['loss']:.3f}, ppl {metrics['ppl']:.2f}, BLEU {metrics['bleu']:.2f}")
        improved = metrics["bleu"] > best_bleu
        best_bleu = max(best_bleu, metrics["bleu"])
        train_state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
            "step": step, "epoch": epoch, "position": position, "best_bleu": best_bleu, "elapsed_s": elapsed,
        }
        ckpt.save_model_dir(ckpt.checkpoint_dir(out, step), model, model_cfg, tokenizer_bytes, train_state, meta)
        ckpt.prune_checkpoints(out, cfg.keep_last)
        if improved:
            best_meta = meta | {"best": {"step": step, "bleu": metrics["bleu"]}}
            ckpt.save_model_dir(out, model, model_cfg, tokenizer_bytes, meta=best_meta)

    def done() -> bool:
        return (
            (cfg.max_steps is not None and step >= cfg.max_steps)
            or (cfg.max_epochs is not None and epoch >= cfg.max_epochs)
            or (cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes)
        )

    model.train()
    run_start = time.perf_counter() - elapsed  # wall-clock, validation included, across resumes
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    last_validated = step
    tokens_since, time_since = 0, 0.0
    while not done():
        for position, micro in _micro_batches(train_data, epoch, position, cfg.update_freq):
            t0 = time.perf_counter()
            batches = [_to_device(train_data, idx, device) for idx in micro]
            n_tokens = sum(int((b[2] != model_cfg.pad_id).sum()) for b in batches)
            loss_total = nll_total = 0.0
            for src, tgt_in, tgt_out in batches:
                with autocast():
                    logits = model(src, tgt_in)
                loss, nll, _ = label_smoothed_cross_entropy(logits, tgt_out, cfg.label_smoothing, model_cfg.pad_id)
                (loss / n_tokens).backward()
                loss_total, nll_total = loss_total + loss.item(), nll_total + nll.item()
            if cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            elapsed = time.perf_counter() - run_start
            tokens_since, time_since = tokens_since + n_tokens, time_since + dt
            bar.update(1)
            if step % cfg.log_every == 0 or step == 1:
                record = {
                    "kind": "train", "step": step, "epoch": epoch, "loss": loss_total / n_tokens,
                    "nll": nll_total / n_tokens, "lr": lr, "tokens_per_s": round(tokens_since / time_since, 1),
                    "elapsed_s": round(elapsed, 1),
                }
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                tokens_since, time_since = 0, 0.0
            if step % cfg.valid_every == 0:
                checkpoint_and_validate()
                last_validated = step
            if done():
                break
        else:  # the epoch ran out
            epoch, position = epoch + 1, 0
    bar.close()
    if last_validated != step or not ckpt.list_checkpoints(out):
        checkpoint_and_validate()
    say(f"done: step {step}, epoch {epoch}, best validation BLEU {best_bleu:.2f}; best model in {out}")
    return out
