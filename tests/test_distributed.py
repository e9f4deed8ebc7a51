"""Training with several processes (torch.distributed, gloo, DistributedDataParallel) on CPU.

Each multi-process test starts 2 processes the way torchrun does: the environment
variables WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which `fit` reads.
"""

import faulthandler
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from transformer.errors import UserError
from transformer.training.checkpoint import list_checkpoints
from transformer.store.modeldir import load_model_dir
from transformer.text.data import TokenBatchSampler
from transformer.training.distributed import shard
from transformer.tasks.translation import EpochBatches

WORLD = 2
DEADLINE_S = 240  # a 2-process test still running after this has hung: it fails, with the ranks' stacks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports_outside_the_ephemeral_range(n: int) -> list[int]:
    """`n` free ports below the kernel's ephemeral range, which gloo's own connections cannot take meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = []
    for port in random.Random().sample(range(10_000, low), k=min(10 * n, low - 10_000)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports below {low}")


def _join(rank: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of a 2-process job on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), TRANSFORMER_DIST_TIMEOUT_MIN="1", GLOO_SOCKET_IFNAME="lo")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `_spawn` asks a hung rank for its stacks
    torch.set_num_threads(1)


def _native_stacks(pid: int) -> str:
    """The native and Python stacks of process `pid` (py-spy, from the test extra), or "" without py-spy."""
    spy = shutil.which("py-spy")
    if spy is None:
        return ""
    try:
        return subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _diagnose(stacks: str) -> str:
    """What a hung rank's native stacks show, in one line."""
    if "ProcessGroupGloo::~ProcessGroupGloo" in stacks and "gil_scoped_acquire" in stacks:
        return ("native deadlock: the main thread frees the gloo process group (joining its workers) while "
                "a gloo worker waits for the GIL")
    if "gil_scoped_acquire" in stacks or "take_gil" in stacks:
        return "a native thread waits for the GIL"
    return "no native deadlock recognised in the stacks"


def _spawn(worker, *args) -> None:
    """Run worker(rank, port, *args) in WORLD processes; fail (never hang) past DEADLINE_S.

    A rank still running then has its Python stacks printed to stderr (faulthandler) and its
    native stacks read with py-spy; the failure message says what they show.
    """
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):  # raises when a rank fails
        if time.monotonic() > deadline:
            alive = [p for p in context.processes if p.is_alive()]
            stacks = {p.pid: _native_stacks(p.pid) for p in alive}
            for p in alive:
                os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2)
            for p in alive:
                p.kill()
            found = "; ".join(f"pid {pid}: {_diagnose(text)}" for pid, text in stacks.items() if text)
            dumps = "\n".join(text for text in stacks.values() if text)
            pytest.fail(f"{worker.__name__}: {len(alive)} rank(s) still running after {DEADLINE_S} s; "
                        f"{found or 'py-spy not installed'}; Python stacks on stderr\n{dumps[-6000:]}")


# --- sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize("update_freq", [1, 3])
def test_shards_cover_every_batch_and_sentence_once(update_freq):
    lengths = [(i * 7) % 23 + 1 for i in range(500)]
    sampler = TokenBatchSampler(lengths, [(i * 5) % 19 + 1 for i in range(500)], max_tokens=120, seed=4)
    batches = EpochBatches(sampler)
    epoch = len(sampler.batches(0))
    steps = -(-epoch // (update_freq * WORLD))
    seen = {r: [i for s in range(steps) for i in shard(s, update_freq, WORLD, r)] for r in range(WORLD)}
    # Each rank takes update_freq batches a step; the ranks interleave and never overlap.
    assert all(len(v) == steps * update_freq for v in seen.values())
    assert sorted(seen[0] + seen[1]) == list(range(steps * update_freq * WORLD))
    assert all(i % WORLD == r for r, v in seen.items() for i in v)
    # Over the first epoch, the ranks together see every sentence exactly once.
    sentences = sorted(j for v in seen.values() for i in v if i < epoch for j in batches[i])
    assert sentences == list(range(500))
    # One process (W = 1) takes the batches of the loop without DDP.
    assert [i for s in range(3) for i in shard(s, update_freq, 1, 0)] == list(range(3 * update_freq))


# --- two processes make the step of one --------------------------------------------------


def _toy():
    from transformer.config import preset
    from transformer.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a man rides a horse", "two dogs play in the snow"] * 20, 30, model_type="char")
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, cfg.vocab_size, (8, 7), generator=g)
    tgt = torch.randint(4, cfg.vocab_size, (8, 6), generator=g)
    tgt[1, 4:] = 0  # padding: the parts hold different numbers of predictions
    tgt[6, 2:] = 0
    return tokenizer, cfg, src, tgt


def _toy_loss(model, batch):
    s, t = batch
    logits = model(s, torch.cat([torch.full((len(t), 1), 2), t[:, :-1]], dim=1))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=0, reduction="sum")
    return loss, int((t != 0).sum())


def _toy_fit(out: Path, update_freq: int, batch_for_step) -> None:
    from transformer.model.models import build_model
    from transformer.training.loop import LoopConfig, Objective, fit

    tokenizer, cfg, _, _ = _toy()
    torch.manual_seed(0)
    model = build_model(cfg)
    # Plain SGD: Adam would turn rounding noise on zero-gradient parameters into full-size steps.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loop = LoopConfig(out=out, max_steps=2, update_freq=update_freq, progress=False, valid_every=100,
                      precision="fp32")  # compared within 1e-6: not bf16
    objective = Objective(batch_for_step, _toy_loss, lambda m: {"loss": 0.0}, "loss", False)
    fit(loop, model, cfg, tokenizer, objective, say=lambda _: None,
        optimizer=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)))


def _quarters_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    _, _, src, tgt = _toy()
    quarters = [(src[k : k + 2], tgt[k : k + 2]) for k in range(0, 8, 2)]
    # 2 ranks x update_freq 2: step s uses batches 4s..4s+3, rank r those = r (mod 2), i.e. the 4 quarters.
    _toy_fit(Path(out), 2, lambda i: quarters[i % 4])


def test_two_processes_make_the_step_of_one_process_on_the_whole_batch(tmp_path):
    """2 processes (gloo) x update_freq 2 on quarters = 1 process on the whole batch, over 2 SGD steps."""
    _, _, src, tgt = _toy()
    _toy_fit(tmp_path / "one", 1, lambda i: (src, tgt))
    _spawn(_quarters_worker, str(tmp_path / "two"))
    one, *_ = load_model_dir(list_checkpoints(tmp_path / "one")[-1])
    two, *_ = load_model_dir(list_checkpoints(tmp_path / "two")[-1])
    torch.manual_seed(0)
    from transformer.model.models import build_model

    initial = build_model(_toy()[1]).state_dict()
    name = "decoder.layers.0.ffn.w1.weight"
    assert (one.state_dict()[name] - initial[name]).abs().max() > 1e-3  # the steps did move the weights
    for (key, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=key)


# --- the command line under 2 processes: checkpoint and exact resume ---------------------


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "400", "--precision", "fp32",
            "--max-tokens", "400", "--warmup", "10", "--lr-scale", "2", "--log-every", "1", "--valid-every", "4",
            "--valid-bleu-lines", "10", "--no-progress", "--seed", "3", *extra]


def _cli_worker(rank: int, port: int, args: list[str]) -> None:
    from transformer.cli import main

    _join(rank, port)
    code = main(args)
    if code != 0:
        raise SystemExit(code)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_two_process_checkpoint_resumes_exactly(data, tmp_path):
    """A 2-process run checkpointed at step 4 and resumed with 2 processes logs the losses of an uninterrupted one
    (the tiny preset has dropout 0.1: every rank's RNG state must come back)."""
    full, part = tmp_path / "full", tmp_path / "part"
    _spawn(_cli_worker, _train_args(data, full, "--max-steps", "8"))
    _spawn(_cli_worker, _train_args(data, part, "--max-steps", "4"))
    assert [c.name for c in list_checkpoints(part)] == ["step_00000004"]
    _spawn(_cli_worker, _train_args(data, part, "--max-steps", "8", "--resume"))
    expected, got = _losses(full), _losses(part)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    _, _, _, meta = load_model_dir(full)
    assert meta["processes"] == 2


FAILURES = {  # what rank 1 raises in step 2, and the line it prints before its process exits
    "error": (lambda: RuntimeError("rank 1 lost its data"),
              "rank 1: training failed: RuntimeError: rank 1 lost its data; leaving the job"),
    "interrupt": (KeyboardInterrupt, "rank 1: interrupted"),
    "user error": (lambda: UserError("valid.de:3: invalid UTF-8"), "rank 1: error: valid.de:3: invalid UTF-8"),
}


def _failing_worker(rank: int, port: int, out: str, failure: str) -> None:
    _join(rank, port)
    _, _, src, tgt = _toy()

    def batch_for_step(i: int):
        if rank == 1 and i >= 2:
            raise FAILURES[failure][0]()
        return src, tgt

    _toy_fit(Path(out), 1, batch_for_step)


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_rank_stops_the_job(tmp_path, capfd, failure):
    """Rank 1 fails in step 2 (an error, ^C, a bad input): it says why on one line and its process exits at
    once, non-zero; rank 0, left waiting in the step's collective, fails too; nothing hangs."""
    with pytest.raises(mp.ProcessExitedException, match="terminated with exit code"):
        _spawn(_failing_worker, str(tmp_path / "run"), failure)
    assert FAILURES[failure][1] in capfd.readouterr().err


def _finishing_worker(rank: int, port: int, ports: list[int]) -> None:
    """The end of a distributed run as `fit` had it when it hung, once per port of `ports`, in one process:
    all_gather_object, a barrier, the end of `job`, and only then DDP freed (as `fit`'s frame was)."""
    from transformer.training import distributed
    from transformer.model.models import build_model

    _join(rank, port)
    for round_port in ports:  # a fresh rendezvous each round
        os.environ["MASTER_PORT"] = str(round_port)
        with distributed.job(torch.device("cpu")):
            ddp = torch.nn.parallel.DistributedDataParallel(build_model(_toy()[1]))
            everyone = [None] * WORLD
            torch.distributed.all_gather_object(everyone, torch.get_rng_state())  # as checkpoint_and_validate
            torch.distributed.barrier()
        del ddp
        assert not torch.distributed.is_initialized()


def test_the_end_of_a_job_is_deterministic(tmp_path):
    """50 ends of a 2-process job in a row (all_gather_object, DDP freed, the group destroyed) never hang."""
    _spawn(_finishing_worker, _ports_outside_the_ephemeral_range(50))


def test_torchrun_runs_the_train_command(data, tmp_path):
    """The documented command (torchrun is torch.distributed.run): torchrun --standalone --nproc_per_node 2 -m transformer train ..."""
    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "TRANSFORMER_DIST_TIMEOUT_MIN": "1", "GLOO_SOCKET_IFNAME": "lo"}
    # torchrun and its workers in a session of their own, so that a timeout can stop all of them.
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "transformer",
         *_train_args(data, out, "--max-steps", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        _, stderr = job.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        _, stderr = job.communicate()
        pytest.fail(f"torchrun still running after {DEADLINE_S} s:\n{stderr[-3000:]}")
    assert job.returncode == 0, stderr[-3000:]
    assert sorted(_losses(out)) == [1, 2]
    assert "2 processes (DistributedDataParallel, gloo)" in stderr
    assert [c.name for c in list_checkpoints(out)] == ["step_00000002"]
