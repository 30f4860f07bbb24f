"""Serving: a real server on a free loopback port, on both engines, answers texts and sentence
pairs with real label names, refuses each bad request with one 4xx ``{"error": ...}`` and keeps
serving; a short load test sees no errors; the original deployment folder is never rewritten."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sparsebert.deploy.client import ClientError, SparseBertClient
from sparsebert.deploy.loadtest import percentile, require_loopback, run_load
from sparsebert.deploy.serve import (MAX_BODY_BYTES, MAX_TEXT_CHARS, DeploymentError, ServedModel,
                                     ServeSettings, check_sequences, create_app, prepare, write_server_config)
from sparsebert.errors import UserError

NAME = "rte"
STARTUP_TIMEOUT_S = 240
PAIR = [["A man is playing a guitar on stage.", "A man is making music."]]


@pytest.fixture(scope="session")
def deployment(exported_run) -> Path:
    """The sparse student of the shared tiny run (tests/conftest.py)."""
    return exported_run / "export" / "student" / "deployment"


@pytest.fixture(scope="session")
def original_digest(deployment) -> str:
    return hashlib.sha256((deployment / "model.onnx").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def label_names(deployment) -> set[str]:
    return set(json.loads((deployment / "config.json").read_text())["id2label"].values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    engine: str
    workdir: Path

    @property
    def infer(self) -> str:
        return f"{self.url}/v2/models/{NAME}/infer"


def wait_until_ready(process: subprocess.Popen, client: SparseBertClient, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if client.ready():
            return
        time.sleep(0.5)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module", params=["deepsparse", "onnxruntime"])
def server(request, deployment, original_digest, tmp_path_factory):
    """One server process per engine (started, used by this module's tests, then stopped)."""
    engine = request.param
    workdir = tmp_path_factory.mktemp(f"serve-{engine}")
    port, log = free_port(), workdir / "server.log"
    command = [sys.executable, "-m", "sparsebert.deploy.serve", str(deployment), "--name", NAME,
               "--port", str(port), "--workdir", str(workdir), "--engine", engine]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, SparseBertClient(url, NAME), log)
        yield Server(url, engine, workdir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(url: str, body: bytes, content_type: str | None = "application/json", method: str = "POST"):
    """(status, parsed JSON body) for a raw request; no proxies, so it stays on loopback."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body if method == "POST" else None, headers=headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def as_json(value) -> bytes:
    return json.dumps(value).encode()


# ---------------------------------------------------------------- answers


def assert_predictions(answer: dict, count: int, label_names: set[str]) -> None:
    assert set(answer) == {"labels", "scores"}
    assert len(answer["labels"]) == len(answer["scores"]) == count
    assert set(answer["labels"]) <= label_names
    assert all(0.0 <= score <= 1.0 for score in answer["scores"])


def test_single_sentence(server, label_names):
    status, answer = post(server.infer, as_json({"sequences": "A man is playing a guitar."}))
    assert status == 200
    assert_predictions(answer, 1, label_names)


def test_sentence_pair(server, label_names):
    status, answer = post(server.infer, as_json({"sequences": PAIR}))
    assert status == 200
    assert_predictions(answer, 1, label_names)


def test_batch_of_texts_and_wrapped_texts_agree(server, label_names):
    texts = ["The cat sat on the mat.", "Stocks fell sharply."]
    _, plain = post(server.infer, as_json({"sequences": texts}))
    status, wrapped = post(server.infer, as_json({"sequences": [[text] for text in texts]}))
    assert status == 200
    assert_predictions(plain, 2, label_names)
    assert wrapped == plain


def test_client_returns_labels_and_scores(server, label_names):
    predictions = SparseBertClient(server.url, NAME).classify(PAIR)
    assert set(predictions.labels) <= label_names and len(predictions.scores) == 1


def test_health_routes(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{NAME}/ready"):
        assert post(server.url + path, b"", method="GET") == (200, {"status": "OK"})


# ---------------------------------------------------------------- bad requests

TOO_LONG = {"sequences": "word " * (MAX_TEXT_CHARS // 5 + 100)}
BAD_REQUESTS = [
    # id, body, content type, route (None: the model's infer route), status, part of the message
    ("malformed-json", b'{"sequences": ', "application/json", None, 400, "malformed JSON"),
    ("empty-body", b"", "application/json", None, 400, "malformed JSON"),
    ("not-an-object", as_json(["a text"]), "application/json", None, 400, "JSON object"),
    ("missing-sequences", as_json({"text": "hi"}), "application/json", None, 400, "missing field 'sequences'"),
    ("number", as_json({"sequences": 5}), "application/json", None, 400, "not a number"),
    ("dict", as_json({"sequences": {"a": "b"}}), "application/json", None, 400, "not an object"),
    ("null", as_json({"sequences": None}), "application/json", None, 400, "not null"),
    ("list-of-numbers", as_json({"sequences": [1, 2]}), "application/json", None, 400, "not a number"),
    ("pair-of-three", as_json({"sequences": [["a", "b", "c"]]}), "application/json", None, 400, "same size"),
    ("empty-string", as_json({"sequences": ""}), "application/json", None, 400, "empty"),
    ("blank-in-pair", as_json({"sequences": [["a", "  "]]}), "application/json", None, 400, "sequences[0][1] is empty"),
    ("empty-list", as_json({"sequences": []}), "application/json", None, 400, "empty list"),
    ("text-too-long", as_json(TOO_LONG), "application/json", None, 400, f"limit is {MAX_TEXT_CHARS:,}"),
    ("body-too-large", as_json({"sequences": "x" * MAX_BODY_BYTES}), "application/json", None, 413, "limit"),
    ("text-plain", b"a text", "text/plain", None, 415, "application/json"),
    ("form-encoded", as_json({"sequences": "hi"}), "application/x-www-form-urlencoded", None, 415, "Content-Type"),
    ("unknown-model", as_json({"sequences": "hi"}), "application/json", "/v2/models/nope/infer", 404, "nope"),
]


@pytest.mark.parametrize("body, content_type, route, status, message",
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_error_body(server, body, content_type, route, status, message):
    got_status, answer = post(server.url + route if route else server.infer, body, content_type)
    assert got_status == status
    assert list(answer) == ["error"] and message in answer["error"]


def test_wrong_method_keeps_the_error_shape(server):
    assert post(server.infer, b"", method="GET") == (405, {"error": f"Method Not Allowed: GET /v2/models/{NAME}/infer"})


def test_still_serving_after_bad_requests(server, label_names):
    status, answer = post(server.infer, as_json({"sequences": PAIR}))
    assert status == 200
    assert_predictions(answer, 1, label_names)


def test_client_raises_the_server_message(server):
    with pytest.raises(ClientError, match="HTTP 400 .*empty list") as raised:
        SparseBertClient(server.url, NAME).classify([])
    assert raised.value.status == 400


def test_load_test_sees_no_errors(server):
    report = run_load(server.url, NAME, clients=2, seconds=3, max_requests=2000)
    assert report["errors"] == report["mismatches"] == 0 and report["requests"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


# ---------------------------------------------------------------- files


def test_config_is_a_deepsparse_server_config_for_the_copy(server, deployment):
    from deepsparse.server.config import ServerConfig

    config = ServerConfig(**yaml.safe_load((server.workdir / "server.yaml").read_text()))
    (endpoint,) = config.endpoints
    assert (endpoint.name, endpoint.route, endpoint.task) == (NAME, f"/{NAME}", "text_classification")
    assert endpoint.kwargs == {"engine_type": server.engine}
    assert endpoint.to_pipeline_config().engine_type == server.engine
    assert Path(endpoint.model) == (server.workdir / "model").resolve() != deployment.resolve()


def test_original_deployment_is_not_rewritten(server, deployment, original_digest):
    assert hashlib.sha256((deployment / "model.onnx").read_bytes()).hexdigest() == original_digest


# ---------------------------------------------------------------- without a server


@pytest.mark.parametrize("sequences", ["a", ["a", "b"], [["a", "b"]], [["a"], ["b"]]])
def test_accepted_sequences(sequences):
    check_sequences(sequences)


def test_settings_reject_unknown_engine_and_bad_name():
    with pytest.raises(DeploymentError, match="engine"):
        ServeSettings(engine="tensorrt")
    with pytest.raises(DeploymentError, match="name"):
        ServeSettings(name="a/b")


def test_prepare_refuses_to_overwrite_the_deployment(tmp_path):
    folder = tmp_path / "model"  # the copy would go to <workdir>/model: the folder itself
    folder.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (folder / name).write_text("")
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "entailment", "1": "not_entailment"}}))
    with pytest.raises(DeploymentError, match="overwrite"):
        prepare(folder, tmp_path, ServeSettings(name=NAME))
    assert (folder / "model.onnx").is_file()


def test_prepare_refuses_a_folder_without_model(tmp_path):
    with pytest.raises(DeploymentError, match="model.onnx"):
        prepare(tmp_path, tmp_path / "work", ServeSettings())


def test_load_test_stays_on_loopback():
    require_loopback("http://127.0.0.1:5543")
    require_loopback("http://localhost:5543")
    with pytest.raises(UserError, match="loopback"):
        require_loopback("http://example.com:5543")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([7.0], 99)) == (50.0, 99.0, 7.0)


def test_model_not_loaded_answers_503(tmp_path):
    """The app before ``load()``: ready and infer answer 503 in the error shape, live answers 200."""
    import uvicorn

    config = write_server_config(tmp_path, tmp_path / "model", ServeSettings(name=NAME))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServedModel(config)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post(url + "/v2/health/live", b"", method="GET") == (200, {"status": "OK"})
        status, answer = post(url + "/v2/health/ready", b"", method="GET")
        assert status == 503 and "not loaded" in answer["error"]
        assert post(f"{url}/v2/models/{NAME}/infer", as_json({"sequences": "hi"}))[0] == 503
    finally:
        server.should_exit = True
        thread.join(timeout=10)
