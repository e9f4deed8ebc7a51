"""`transformer serve --model LMRUN`: the official `openai` client against a real server process on 127.0.0.1."""

import asyncio
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serve_process import ServeProcess

import transformer
from transformer.inference.sampling import stream

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "O", "KING RICHARD II:\nI", "What say you?",
           "MENENIUS:\nEither you must", "Good", "JULIET:\nAy me!", "Hark", "Second Citizen:", "BRUTUS:", "Peace"]


@pytest.fixture(scope="module")
def server(lm_dir):
    process = ServeProcess(lm_dir, "--batch-size", "8", "--kv-block-tokens", "8", "--timeout-s", "60")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=30, max_retries=0)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return transformer.load(lm_dir, device="cpu")


def _lm_sample(lm_dir, prompt: str, tokens: int, *flags: str) -> str:
    out = subprocess.run([sys.executable, "-m", "transformer", "lm", "sample", "--model", str(lm_dir), "--prompt",
                          prompt, "--tokens", str(tokens), *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("flags, settings", [(("--temperature", "0"), {"temperature": 0}),
                                             (("--temperature", "0.9", "--seed", "5"), {"temperature": 0.9, "seed": 5})])
def test_the_openai_client_gets_what_lm_sample_prints(server, client, lm_dir, flags, settings):
    # lm sample goes on past EOS, as ignore_eos does (else the server stops there: finish_reason "stop")
    completion = client.completions.create(model=lm_dir.name, prompt="ROMEO:", max_tokens=30,
                                           extra_body={"ignore_eos": True}, **settings)
    choice = completion.choices[0]
    printed = _lm_sample(lm_dir, "ROMEO:", 30, *flags)
    assert printed.rstrip("\n") == ("ROMEO:" + choice.text).rstrip("\n")
    assert choice.finish_reason == "length" and choice.text.strip()
    assert completion.usage.completion_tokens == 30
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 30


def test_a_stream_joins_to_the_whole_answer(client, lm_dir):
    chunks = list(client.completions.create(model=lm_dir.name, prompt="JULIET:", max_tokens=40, temperature=0.8,
                                            seed=9, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    whole = client.completions.create(model=lm_dir.name, prompt="JULIET:", max_tokens=40, temperature=0.8, seed=9)
    assert "".join(texts) == whole.choices[0].text
    assert len(texts) > 10  # one chunk per token (or a few)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40


def test_a_seed_repeats_the_text_and_n_choices_differ(client, lm_dir):
    ask = dict(model=lm_dir.name, prompt=["Hark", "Peace"], max_tokens=20, temperature=1.0, n=2)
    first, again = (client.completions.create(seed=3, **ask) for _ in range(2))
    other = client.completions.create(seed=4, **ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in again.choices] and texts != [c.text for c in other.choices]
    assert len(set(texts)) == 4


def test_the_models_list_and_a_stop_string(client, lm_dir):
    assert [m.id for m in client.models.list().data] == [lm_dir.name]
    text = client.completions.create(model=lm_dir.name, prompt="O", max_tokens=40, temperature=1, seed=2).choices[0].text
    stop = text[10:13]
    assert stop.strip() and text.find(stop) == 10
    stopped = client.completions.create(model=lm_dir.name, prompt="O", max_tokens=40, temperature=1, seed=2, stop=stop)
    assert stopped.choices[0].text == text[:10] and stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_each_get_what_they_would_get_alone(server, lm_dir, lm):
    """Twelve requests at once, of different prompts and lengths, through the continuous batch of 8."""
    asks = [dict(prompt=p, max_tokens=5 + 9 * i, temperature=0.8, seed=i, extra_body={"ignore_eos": True})
            for i, p in enumerate(PROMPTS)]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
        answers = await asyncio.gather(*(client.completions.create(model=lm_dir.name, **ask) for ask in asks))
        await client.close()
        return answers

    answers = asyncio.run(all_at_once())
    for ask, answer in zip(asks, answers):
        ids = lm.tokenizer.encode([ask["prompt"]])[0]
        alone = list(stream(lm.model, ids, ask["max_tokens"], 0.8, None, None, ask["seed"]))
        base, whole = lm.tokenizer.decode([ids, ids + alone])
        assert answer.choices[0].text == whole[len(base):]


def test_a_client_that_goes_away_frees_its_sequence_and_blocks(server, lm_dir):
    body = {"model": lm_dir.name, "prompt": "ROMEO:", "max_tokens": 120, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i == 3:
                break  # leave mid-stream: the connection closes
    end = time.monotonic() + 10
    while time.monotonic() < end and (_metric(server.url, "transformer_lm_kv_blocks_used") > 0
                                      or _metric(server.url, "transformer_lm_running_sequences") > 0
                                      or _metric(server.url, "transformer_requests_in_flight") > 0):
        time.sleep(0.1)
    assert _metric(server.url, "transformer_requests_in_flight") == 0  # it counts against --max-queue no more
    assert _metric(server.url, "transformer_lm_kv_blocks_used") == 0
    assert _metric(server.url, "transformer_lm_running_sequences") == 0
    assert _metric(server.url, "transformer_lm_kv_blocks_free") > 0
    assert _metric(server.url, "transformer_lm_time_to_first_token_seconds_count") > 0


@pytest.mark.parametrize("body, status, code", [
    ({"prompt": "O", "max_tokens": 500}, 422, "max_tokens"),
    ({"prompt": "ROMEO: " * 200, "max_tokens": 1}, 413, "max_prompt_tokens"),
    ({"prompt": "O" * 30, "max_tokens": 120}, 422, "max_len"),
    ({"prompt": "O", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "O", "temperature": -1}, 422, "temperature"),
    ({"prompt": ["O"] * 5, "n": 16, "max_tokens": 1}, 413, "max_sequences"),
    ({"prompt": "O", "n": 17}, 422, "n"),
    ({"prompt": ""}, 422, "prompt"),
    (b'{"prompt": "a \\ud800"}', 422, "prompt"),  # JSON can carry a lone surrogate; Unicode text cannot
    ({"prompt": "O", "model": "another"}, 404, "model_not_found"),
])
def test_requests_over_a_limit_are_refused_naming_it(server, body, status, code):
    raw = dict(content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) else dict(json=body)
    response = httpx.post(f"{server.url}/v1/completions", timeout=10, **raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("content", [b'{"prompt": "O",', b'{"prompt": "\xff"}'])
def test_a_body_that_is_not_json_in_utf8_is_400(server, content):
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_the_openai_client_raises_its_own_errors(client, lm_dir):
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=lm_dir.name, prompt="O", max_tokens=500)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="O", max_tokens=5)


def test_overload_gets_fast_503s_and_the_server_stays_healthy(lm_dir):
    server = ServeProcess(lm_dir, "--batch-size", "1", "--max-queue", "2", "--timeout-s", "60",
                          "--max-new-tokens", "100")
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as http:
                async def one(i):
                    start = time.monotonic()
                    r = await http.post(f"{server.url}/v1/completions",
                                        json={"prompt": PROMPTS[i], "max_tokens": 100, "ignore_eos": True})
                    return r, time.monotonic() - start
                return await asyncio.gather(*(one(i) for i in range(10)))

        answers = asyncio.run(burst())
        busy = [(r, s) for r, s in answers if r.status_code == 503]
        done = [r for r, _ in answers if r.status_code == 200]
        assert len(done) + len(busy) == 10 and len(done) >= 2 and busy
        assert all(r.headers["Retry-After"] and r.json()["error"]["code"] == "max_queue" for r, _ in busy)
        assert max(s for _, s in busy) < 2.0  # at once, not after the queue
        assert all(r.json()["usage"]["completion_tokens"] == 100 for r in done)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "O", "max_tokens": 3}, timeout=30)
        assert after.status_code == 200
        over = httpx.post(f"{server.url}/v1/completions", json={"prompt": "O", "max_tokens": 101}, timeout=30)
        assert over.status_code == 422 and "limit of 100" in over.json()["error"]["message"]  # --max-new-tokens
    finally:
        server.stop()


def test_sigterm_lets_a_running_stream_finish(lm_dir):
    server = ServeProcess(lm_dir, "--batch-size", "4")
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 100, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            lines = iter(response.iter_lines())
            next(lines)
            server.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_a_ctranslate2_export_of_a_language_model_is_refused_in_one_line(lm_dir, tmp_path, capsys):
    from transformer.cli import main

    assert main(["export", "--model", str(lm_dir), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    capsys.readouterr()
    assert main(["serve", "--model", str(tmp_path / "ct2"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "serve the run it was exported from" in err
