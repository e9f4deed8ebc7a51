"""Memory that stays bounded (issue 31): oneDNN's primitive cache is bounded by the package, and the
training loop gives the C heap's free pages back between phases. The figures are in BENCHMARKS.md
(benchmarks/memory.py); these tests check the mechanisms."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

import transformer
from transformer.device import release_free_memory

# Convolutions of `n` distinct shapes, twice over: oneDNN makes a primitive for each shape, and says
# whether it found it in its cache (ONEDNN_VERBOSE=profile_create). On every CPU kind PyTorch convolves
# through oneDNN, as it multiplies bf16 matrices on CPUs with native bf16.
PROBE = textwrap.dedent("""
    import sys, torch
    import transformer
    import torch.nn.functional as F
    w = torch.randn(4, 1, 1, 1)
    for _ in range(2):
        for n in range(1, int(sys.argv[1]) + 1):
            F.conv2d(torch.randn(n, 1, 2, 2), w)
""")


def _second_pass_hits(shapes: int, **env: str) -> int:
    """How many of the second pass's convolutions oneDNN found in its cache."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(shapes)], capture_output=True, text=True, check=True,
                         env={"ONEDNN_VERBOSE": "profile_create", "PATH": "", **env})
    convolutions = [line for line in out.stdout.splitlines() if ",create:" in line and ",convolution," in line]
    half = len(convolutions) // 2  # one shape (batch 1) takes another path than oneDNN's
    assert len(convolutions) == 2 * half >= 2 * (shapes - 1)
    return sum("create:cache_hit" in line for line in convolutions[half:])


def test_onednn_keeps_at_most_the_package_bound_of_primitives_unless_the_user_sets_one():
    over = transformer.ONEDNN_CACHE + 20  # shapes, each a convolution and its reorders: more entries than the bound
    assert _second_pass_hits(over) == 0  # least recently used first out: none left for the second pass
    assert _second_pass_hits(40) >= 38  # within the bound they stay
    assert _second_pass_hits(over, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") >= over - 2  # the user's setting wins


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="glibc's malloc_trim only")
def test_released_heap_pages_leave_the_resident_set():
    import torch

    # 64 KB tensors come from the heap (below glibc's mmap threshold); the last one pins the heap's top,
    # so that freeing the others trims nothing by itself
    held = [torch.ones(16 * 1024) for _ in range(4000)]  # 256 MB
    del held[:-1]
    before = _rss_kb()
    release_free_memory()
    assert before - _rss_kb() > 150 * 1024  # KB


def test_training_releases_the_heap_at_the_start_and_after_each_validation(tmp_path, monkeypatch):
    from transformer.cli import main
    from transformer.corpora import multi30k_dir
    from transformer.training import loop

    calls = []
    monkeypatch.setattr(loop, "release_free_memory", lambda: calls.append(1))
    source = multi30k_dir()
    for split, n in (("train", 200), ("valid", 20)):
        for lang in ("en", "de"):
            lines = (source / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (tmp_path / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--vocab-size", "500", "--max-tokens", "400", "--max-steps", "8", "--valid-every", "4",
                 "--no-progress"]) == 0
    assert len(calls) == 3  # the start, steps 4 and 8
