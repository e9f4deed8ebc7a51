"""`transformer serve` in-process: the API, batching across requests, every error path, health and metrics.

The engine is our model behind a gate (`GatedEngine`): a test closes the gate to hold the model
worker inside a batch, which lets it fill the queue, pass a deadline, or see that /health answers
while a batch decodes, without relying on timing.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from transformer.cli import main
from transformer.inference.search import SearchConfig
from transformer.inference.translate import translate_lines
from transformer.serve.app import ServeConfig, create_app
from transformer.serve.batcher import BatchConfig
from transformer.serve.engine import TorchEngine
from transformer.store.modeldir import load_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SEARCH = SearchConfig(max_len_a=0.0, max_len_b=6)  # short outputs: an untrained model never stops by itself
LINES = ["a man rides a horse .", "a man .", "ein mann reitet ein pferd .", "a horse", "rides a man a horse ."]


class GatedEngine(TorchEngine):
    """Our engine, waiting at `gate` before each batch (open by default), recording the batches it decodes."""

    def __init__(self, *args, fail_on: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch is waiting at the gate
        self.batches: list[list[str]] = []
        self.fail_on = fail_on

    def translate_batch(self, lines, beam, alpha):
        self.entered.set()
        assert self.gate.wait(20), "a test left the gate closed"
        self.batches.append(list(lines))
        if self.fail_on in lines:
            raise RuntimeError("injected failure")
        return super().translate_batch(lines, beam, alpha)


@pytest.fixture(scope="module")
def loaded(untrained_model_dir):
    model, _, tokenizer, _ = load_model_dir(untrained_model_dir)
    return model, tokenizer


def expected(loaded, lines, beam=4, alpha=0.6):
    """The library's translation of `lines`, all in one call (what `transformer translate` does)."""
    model, tokenizer = loaded
    return translate_lines(model, tokenizer, lines, SearchConfig(beam=beam, alpha=alpha, max_len_a=0.0, max_len_b=6))


def serving(loaded, cfg=ServeConfig(), **engine_kwargs):
    """(engine, client) of an app over a `GatedEngine`; use the client in a `with` block."""
    model, tokenizer = loaded
    engine = GatedEngine(model, tokenizer, SEARCH, "tiny", **engine_kwargs)
    return engine, TestClient(create_app(engine, cfg))


def wait_ready(client):
    for _ in range(500):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the server never became ready")


def until(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def hold(engine, client, pool, text):
    """Close the gate and send `text`: the worker is held in that request's batch; its answer's future."""
    engine.gate.clear()
    engine.entered.clear()
    held = pool.submit(client.post, "/translate", json={"text": text})
    assert engine.entered.wait(10)
    return held


def strict_json(response):
    """The body of `response` as JSON in UTF-8 and nothing else (no NaN or Infinity, which Python would accept)."""

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


def metric(client, name, **labels):
    """The value of sample `name` with `labels` in /metrics (0 if absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_translations_keep_their_order_and_equal_the_library(loaded):
    _, client = serving(loaded)
    with client:
        wait_ready(client)
        r = client.post("/translate", json={"text": LINES})
        assert r.status_code == 200
        body = r.json()
        assert body["translations"] == expected(loaded, LINES)
        assert body["model"] == "tiny" and body["elapsed_ms"] > 0
        one = client.post("/translate", json={"text": LINES[2], "beam": 1, "alpha": 0.0}).json()
        assert one["translations"] == expected(loaded, [LINES[2]], beam=1, alpha=0.0)


def test_sentences_of_concurrent_requests_share_batches(loaded):
    engine, client = serving(loaded, ServeConfig(batch=BatchConfig(max_wait_ms=0)))
    requests = [LINES[i : i + 2] for i in range(len(LINES) - 1)]  # 4 requests of 2 sentences
    with client, ThreadPoolExecutor(len(requests) + 1) as pool:
        wait_ready(client)
        first = hold(engine, client, pool, ["a horse rides ."])  # the others queue behind that batch
        answers = [pool.submit(client.post, "/translate", json={"text": lines}) for lines in requests]
        until(lambda: metric(client, "transformer_queue_sentences") == 8)
        engine.gate.set()
        assert first.result().json()["translations"] == expected(loaded, ["a horse rides ."])
        for lines, answer in zip(requests, answers):
            assert answer.result().status_code == 200
            assert answer.result().json()["translations"] == expected(loaded, lines)
    assert engine.batches[-1] and len(engine.batches[-1]) == 8  # all four requests decoded as one batch
    assert sorted(engine.batches[-1]) == sorted(line for lines in requests for line in lines)


def test_after_a_batch_the_clients_it_answered_get_max_wait_ms_to_join_the_next(loaded):
    engine, client = serving(loaded, ServeConfig(batch=BatchConfig(max_wait_ms=500)))
    with client, ThreadPoolExecutor(4) as pool:
        wait_ready(client)
        first = hold(engine, client, pool, "a horse rides .")
        queued = [pool.submit(client.post, "/translate", json={"text": line}) for line in LINES[:2]]
        until(lambda: metric(client, "transformer_queue_sentences") == 2)
        time.sleep(0.6)  # the queued sentences have waited longer than max_wait_ms
        engine.gate.set()
        assert first.result().status_code == 200
        late = client.post("/translate", json={"text": LINES[2]})  # sent once the first is answered
        assert late.json()["translations"] == expected(loaded, [LINES[2]])
        assert [q.result().json()["translations"][0] for q in queued] == expected(loaded, LINES[:2])
    assert sorted(engine.batches[-1]) == sorted(LINES[:3])  # one batch: the queued two and the late one


def test_a_batch_stays_within_max_batch_tokens(loaded):
    budget = 24
    engine, client = serving(loaded, ServeConfig(batch=BatchConfig(max_batch_tokens=budget, max_wait_ms=0)))
    lines = LINES * 3
    with client, ThreadPoolExecutor(len(lines) + 1) as pool:
        wait_ready(client)
        hold(engine, client, pool, "a man .")
        answers = [pool.submit(client.post, "/translate", json={"text": line}) for line in lines]
        until(lambda: metric(client, "transformer_queue_sentences") == len(lines))
        engine.gate.set()
        assert [a.result().json()["translations"][0] for a in answers] == expected(loaded, lines)
    decoded = engine.batches[2:]  # after the warm-up and the held batch
    assert sum(map(len, decoded)) == len(lines) and max(map(len, decoded)) > 1
    for batch in decoded:
        widest = max(engine.lengths(batch)) + 1  # EOS
        assert len(batch) == 1 or len(batch) * widest <= budget, batch


def test_a_full_queue_answers_503_at_once_with_retry_after(loaded):
    engine, client = serving(loaded, ServeConfig(batch=BatchConfig(max_queue=2, max_wait_ms=0)))
    with client, ThreadPoolExecutor(2) as pool:
        wait_ready(client)
        engine.gate.clear()
        held = [pool.submit(client.post, "/translate", json={"text": line}) for line in LINES[:2]]
        until(lambda: metric(client, "transformer_requests_in_flight") == 2)
        r = client.post("/translate", json={"text": "a man ."})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1" and r.json()["limit"] == "max_queue"
        assert client.get("/health").status_code == 200  # answers while the worker is held in a batch
        engine.gate.set()
        assert [h.result().json()["translations"][0] for h in held] == expected(loaded, LINES[:2])
        assert client.post("/translate", json={"text": "a man ."}).status_code == 200


def test_a_passed_deadline_answers_504_and_its_sentences_are_never_decoded(loaded):
    engine, client = serving(loaded, ServeConfig(batch=BatchConfig(max_wait_ms=0), timeout_s=0.3))
    with client, ThreadPoolExecutor(1) as pool:
        wait_ready(client)
        held = hold(engine, client, pool, "a man .")
        r = client.post("/translate", json={"text": "rides a horse ."})  # waits behind the held batch
        assert r.status_code == 504 and r.json()["limit"] == "timeout_s"
        engine.gate.set()
        assert held.result().status_code == 504  # held past its own deadline too
        assert client.post("/translate", json={"text": "a horse"}).status_code == 200
    assert all("rides a horse ." not in batch for batch in engine.batches)


def test_a_failing_batch_answers_500_and_the_worker_goes_on(loaded):
    _, client = serving(loaded, fail_on="boom")
    with client:
        wait_ready(client)
        r = client.post("/translate", json={"text": ["boom"]})
        assert r.status_code == 500 and r.json()["error"] == "decoding failed: RuntimeError: injected failure"
        after = client.post("/translate", json={"text": ["a man ."]})
        assert after.json()["translations"] == expected(loaded, ["a man ."])


@pytest.mark.parametrize("body, limit, words", [
    ({"text": ["a"] * 5}, "max_sentences", "5 sentences, over the limit of 4"),
    ({"text": ["a", "b" * 41]}, "max_chars", "sentence 2 has 41 characters, over the limit of 40"),
])
def test_limits_answer_413_naming_the_limit(loaded, body, limit, words):
    _, client = serving(loaded, ServeConfig(max_sentences=4, max_chars=40))
    with client:
        r = client.post("/translate", json=body)
        assert r.status_code == 413 and r.json()["limit"] == limit and words in r.json()["error"]


def test_a_sentence_over_the_models_length_answers_413(loaded):
    _, client = serving(loaded, ServeConfig(max_chars=10_000))
    with client:
        r = client.post("/translate", json={"text": "a man rides a horse . " * 100})
        assert r.status_code == 413 and r.json()["limit"] == "model_max_tokens"
        assert "over the model's limit of 255" in r.json()["error"]


def test_a_body_over_the_size_limit_is_refused_unread(loaded):
    cfg = ServeConfig(max_sentences=1, max_chars=10)
    _, client = serving(loaded, cfg)
    with client:
        r = client.post("/translate", content=b" " * (cfg.max_body_bytes + 1),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes"


@pytest.mark.parametrize("body", [b'{"text": "a"', b'{"text": "\xff\xfe"}', b"", b"\xc3\x28"])
def test_bad_json_or_utf8_answers_400(loaded, body):
    _, client = serving(loaded)
    with client:
        r = client.post("/translate", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


@pytest.mark.parametrize("body, where", [
    ({"text": 3}, "text"), ({"text": "a", "beam": 0}, "beam"), ({"text": "a", "beam": 17}, "beam"),
    ({"text": "a", "alpha": -1}, "alpha"), ({"txt": "a"}, "text"), ({"text": []}, "text"), ({"text": [1]}, "text"),
])
def test_requests_of_the_wrong_shape_answer_422(loaded, body, where):
    _, client = serving(loaded)
    with client:
        r = client.post("/translate", json=body)
        assert r.status_code == 422 and r.json()["error"].startswith(where)


SURROGATES = [  # valid JSON, but not Unicode text: sentencepiece fails on it
    ("/translate", b'{"text": "\\ud800"}', "text: the sentence is not Unicode text: a lone surrogate (U+D800) at "
                                           "character 1"),
    ("/translate", b'{"text": ["ok", "\\udc00 ok"]}', "text: sentence 2 is not Unicode text: a lone surrogate "
                                                     "(U+DC00) at character 1"),
    ("/attention", b'{"text": "a \\udbff"}', "text: the sentence is not Unicode text: a lone surrogate (U+DBFF) at "
                                            "character 3"),
]


@pytest.mark.parametrize("path, body, words", SURROGATES)
def test_a_lone_surrogate_answers_422_naming_the_sentence(loaded, path, body, words):
    engine, client = serving(loaded)
    with client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and strict_json(r)["error"] == words and strict_json(r)["limit"] is None
        assert strict_json(r)["detail"][0]["loc"] == ["body", "text"]
        assert client.post(path, json={"text": "a man ."}).status_code == 200
    assert all("ok" not in batch for batch in engine.batches)


@pytest.mark.parametrize("path, body, where", [
    ("/translate", b'{"text": "a", "alpha": NaN}', "alpha"),
    ("/translate", b'{"text": "a", "alpha": Infinity}', "alpha"),
    ("/translate", b'{"text": "a", "beam": -Infinity}', "beam"),
    ("/translate", b'{"text": "a", "beam": 1e999}', "beam"),  # Python's JSON reads it as inf
    ("/attention", b'{"text": "a", "beam": NaN}', "beam"),
    ("/attention", b'{"text": "a", "alpha": -Infinity}', "alpha"),
])
def test_numbers_not_finite_answer_422_in_valid_json(loaded, path, body, where):
    _, client = serving(loaded)
    with client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and strict_json(r)["error"] == f"{where}: Input should be a finite number"


def test_the_422_of_a_nan_where_text_belongs_is_valid_json(loaded):
    _, client = serving(loaded)
    with client:
        r = client.post("/translate", content=b'{"text": ["a", NaN]}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and strict_json(r)["error"].startswith("text")


def test_health_says_loading_until_the_warm_up_is_done(loaded):
    engine, client = serving(loaded)
    engine.gate.clear()  # holds the warm-up
    with client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        engine.gate.set()
        wait_ready(client)
        assert client.get("/health").json() == {"status": "ready", "model": "tiny"}


def test_metrics_count_requests_batches_and_tokens(loaded):
    engine, client = serving(loaded, ServeConfig(max_sentences=2))
    with client:
        wait_ready(client)
        for _ in range(3):
            translations = client.post("/translate", json={"text": LINES[:2]}).json()["translations"]
        assert client.post("/translate", json={"text": LINES}).status_code == 413
        assert metric(client, "transformer_requests_total", endpoint="/translate", status="200") == 3
        assert metric(client, "transformer_requests_total", endpoint="/translate", status="413") == 1
        assert metric(client, "transformer_request_seconds_count", endpoint="/translate") == 4
        assert metric(client, "transformer_batch_sentences_sum") == 6  # the warm-up is not counted
        tokens = 3 * sum(engine.lengths(translations))  # an untrained model may say nothing: then 0
        assert metric(client, "transformer_generated_tokens_total") == tokens
        assert (metric(client, "transformer_tokens_per_second") > 0) == (tokens > 0)
        assert metric(client, "transformer_queue_sentences") == 0
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_two_apps_in_one_process_keep_their_own_metrics(loaded):
    (_, a), (_, b) = serving(loaded), serving(loaded)
    with a, b:
        wait_ready(a)
        a.post("/translate", json={"text": "a man ."})
        assert metric(a, "transformer_requests_total", endpoint="/translate", status="200") == 1
        assert metric(b, "transformer_requests_total", endpoint="/translate", status="200") == 0


def test_attention_gives_a_heatmap_of_the_translation(loaded):
    _, client = serving(loaded)
    with client:
        wait_ready(client)
        body = client.post("/attention", json={"text": "a man rides a horse ."}).json()
        translated = client.post("/translate", json={"text": "a man rides a horse ."}).json()["translations"][0]
        assert body["translation"] == translated
        assert len(body["weights"]) == len(body["target"]) and body["source"][-1] == "</s>"
        assert all(len(row) == len(body["source"]) and abs(sum(row) - 1) < 1e-2 for row in body["weights"])
        assert client.post("/attention", json={"text": "  "}).status_code == 422


def test_the_page_and_the_schema_are_served(loaded):
    _, client = serving(loaded)
    with client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="translate"' in page.text
        schema = client.get("/openapi.json").json()
        assert {"/translate", "/attention", "/health", "/metrics"} <= set(schema["paths"])
        assert "TranslateRequest" in schema["components"]["schemas"]
        assert client.get("/info").json()["limits"]["max_sentences"] == 64


@pytest.mark.parametrize("argv, words", [
    (["serve", "--model", "no/such/folder"], "no/such/folder"),
    (["serve", "--model", "M", "--port", "70000"], "--port 70000: must be >= 0 and <= 65535"),
    (["serve", "--model", "M", "--max-wait-ms", "-1"], "--max-wait-ms -1: must be >= 0"),
    (["serve", "--model", "M", "--timeout-s", "0"], "--timeout-s 0: must be > 0"),
])
def test_bad_flags_and_missing_models_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_a_port_in_use_is_one_line(capsys, untrained_model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(untrained_model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: cannot listen" in err


def test_an_exported_ctranslate2_model_is_served(untrained_model_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    from transformer.export import export_model
    from transformer.inference.ctranslate2 import CTranslate2Translator
    from transformer.serve.engine import CTranslate2Engine

    export_model(untrained_model_dir, "ctranslate2", tmp_path / "ct2")
    translator = CTranslate2Translator(tmp_path / "ct2", threads=1)
    with TestClient(create_app(CTranslate2Engine(translator, SEARCH, "ct2"))) as client:
        wait_ready(client)
        r = client.post("/translate", json={"text": LINES, "beam": 1})
        assert r.json()["translations"] == translator.translate(LINES, replace(SEARCH, beam=1, alpha=0.6))
        assert client.get("/info").json()["engine"] == "ctranslate2" and not client.get("/info").json()["attention"]
        assert client.post("/attention", json={"text": LINES[0]}).status_code == 501
        for path, body, words in SURROGATES[:2]:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and strict_json(r)["error"] == words


def test_connections_to_the_bound_socket_send_without_delay():
    """asyncio turns Nagle's algorithm off (TCP_NODELAY) only on TCP-protocol sockets; without it a small answer
    waits for a delayed ACK (about 40 ms a request on loopback)."""
    import asyncio
    import socket

    from transformer.serve.server import bind

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        def connected(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=bind("127.0.0.1", 0))
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value

    assert asyncio.run(accepted_nodelay()) != 0


# ---- empty sentences (issue #31) ---------------------------------------------------------------------------


def test_empty_sentences_are_answered_empty_in_their_place_without_decoding(loaded, monkeypatch):
    """An empty or blank sentence is answered "" (the model would invent a sentence for the lone EOS)."""
    from transformer.inference import translate as inference

    decoded: list[int] = []  # the sentences of each batch our search decodes
    search = inference.translate_batch
    monkeypatch.setattr(inference, "translate_batch",
                        lambda m, src, cfg: decoded.append(len(src)) or search(m, src, cfg))
    dog, cat = expected(loaded, [LINES[1]])[0], expected(loaded, [LINES[3]])[0]
    _, client = serving(loaded)
    with client:
        wait_ready(client)
        decoded.clear()  # the warm-up
        assert client.post("/translate", json={"text": ""}).json()["translations"] == [""]
        assert client.post("/translate", json={"text": ["  "]}).json()["translations"] == [""]
        assert decoded == []
        r = client.post("/translate", json={"text": [LINES[1], "", LINES[3]]})
        assert r.status_code == 200 and r.json()["translations"] == [dog, "", cat]
        assert sum(decoded) == 2
