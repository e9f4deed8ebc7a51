"""A real `transformer serve` process on 127.0.0.1: concurrent clients get what `transformer translate` gives,
overload gets fast 503s and leaves the server healthy, a chunked body is held to the size limit, and SIGTERM
finishes the requests in flight, then exits 0."""

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_process import ServeProcess

from transformer.corpora import multi30k_dir
from transformer.serve.app import ServeConfig

SEARCH = ["--max-len-a", "0", "--max-len-b", "8"]  # an untrained model never stops by itself: keep outputs short


def translate_cli(model, lines, *flags):
    """`transformer translate` of `lines`, as a process."""
    out = subprocess.run([sys.executable, "-m", "transformer", "translate", "--model", str(model), "--no-progress",
                          *SEARCH, *flags], input="".join(line + "\n" for line in lines),
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.splitlines()


@pytest.fixture(scope="module")
def sentences():
    return (multi30k_dir() / "test2016.en").read_text(encoding="utf-8").splitlines()[:30]


@pytest.fixture
def server(untrained_model_dir):
    started = []

    def start(*flags):
        started.append(ServeProcess(untrained_model_dir, *SEARCH, *flags))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def test_concurrent_requests_get_what_translate_gives(server, untrained_model_dir, sentences):
    url = server("--max-wait-ms", "20").url
    requests = [sentences[i : i + 1 + i % 3] for i in range(0, 24, 2)]  # 12 requests of 1 to 3 sentences
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda lines: client.post(f"{url}/translate", json={"text": lines}), requests))
        metrics = client.get(f"{url}/metrics").text
    reference = dict(zip(sentences, translate_cli(untrained_model_dir, sentences)))
    for lines, answer in zip(requests, answers):
        assert answer.status_code == 200
        assert answer.json()["translations"] == [reference[line] for line in lines]
    assert 'transformer_requests_total{endpoint="/translate",status="200"} 12.0' in metrics


def test_overload_gets_fast_503s_and_the_server_stays_healthy(server, sentences):
    url = server("--max-queue", "1", "--max-wait-ms", "2000").url  # the one accepted request waits 2 s
    start = threading.Barrier(16)

    def call(line):
        start.wait(10)
        began = time.monotonic()
        r = httpx.post(f"{url}/translate", json={"text": line}, timeout=30)
        return r, time.monotonic() - began

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, sentences[:16]))
    busy = [(r, s) for r, s in answers if r.status_code == 503]
    assert busy and {r.status_code for r, _ in answers} == {200, 503}
    assert all(r.headers["retry-after"] == "1" and r.json()["limit"] == "max_queue" for r, _ in busy)
    assert max(s for _, s in busy) < min(s for r, s in answers if r.status_code == 200)  # refused before any answer
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert httpx.post(f"{url}/translate", json={"text": "A dog runs."}, timeout=30).status_code == 200


def post_chunked(url, chunks):
    """POST /translate with `chunks` as the body, Transfer-Encoding: chunked and no Content-Length: (status, JSON)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/translate", body=iter(chunks), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def test_a_chunked_body_is_counted_against_the_size_limit(server):
    url = server("--max-sentences", "1", "--max-chars", "10").url
    limit = ServeConfig(max_sentences=1, max_chars=10).max_body_bytes
    padding = [b" " * 1000] * (4 * limit // 1000)  # JSON may end in any whitespace: a valid body 4 times the limit
    status, body = post_chunked(url, [b'{"text": "a man ."}', *padding])
    assert status == 413 and body == {"error": f"the body has more than {limit} bytes, over the limit",
                                      "limit": "max_body_bytes"}
    status, body = post_chunked(url, [b'{"text": ', b'"a man ."}', *padding[: limit // 2000]])
    assert status == 200 and len(body["translations"]) == 1
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'transformer_requests_total{endpoint="/translate",status="413"} 1.0' in metrics


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(server, untrained_model_dir, sentences):
    process = server("--max-wait-ms", "1500")  # a request waits 1.5 s for company: SIGTERM comes meanwhile
    lines = sentences[:3]
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{process.url}/translate", json={"text": lines}, timeout=30)
        for _ in range(200):
            if "transformer_requests_in_flight 1.0" in httpx.get(f"{process.url}/metrics", timeout=5).text:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the request never arrived")
        process.terminate()
        assert answer.result().status_code == 200
    assert answer.result().json()["translations"] == translate_cli(untrained_model_dir, lines)
    assert process.proc.wait(20) == 0, "".join(process.stderr)  # not 143 (-15): uvicorn raises SIGTERM again
    assert "Traceback" not in "".join(process.stderr)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{process.url}/health", timeout=2)


def test_an_exported_ctranslate2_folder_is_served_as_translate_translates_it(untrained_model_dir, tmp_path, sentences):
    pytest.importorskip("ctranslate2")
    from transformer.export import export_model

    export_model(untrained_model_dir, "ctranslate2", tmp_path / "ct2")
    process = ServeProcess(tmp_path / "ct2", *SEARCH)  # --engine auto: an exported folder is CTranslate2's
    try:
        lines = sentences[:6]
        answer = httpx.post(f"{process.url}/translate", json={"text": lines}, timeout=30).json()
        assert answer["translations"] == translate_cli(tmp_path / "ct2", lines)
        assert httpx.get(f"{process.url}/info", timeout=5).json()["engine"] == "ctranslate2"
    finally:
        process.stop()
