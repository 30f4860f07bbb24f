"""Serving: a real server on a free loopback port, on both engines, answers sentence pairs (the
tiny run is RTE, a pair task) with real label names, refuses single texts with 422 and each bad
request with one 4xx ``{"error": ...}`` and keeps serving; the largest valid request fits the body
limit however it is encoded; a short load test sees no errors; the original deployment folder is
never rewritten."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sparsebert.deploy.client import ClientError, SparseBertClient
from sparsebert.deploy.engines import pipeline_engine_type
from sparsebert.deploy.errors import ModelNotReady, UnprocessableInput
from sparsebert.deploy.loadtest import INPUTS, percentile, require_loopback, run_load
from sparsebert.deploy.local import free_port, local_server
from sparsebert.deploy.serve import (MAX_BODY_BYTES, MAX_SEQUENCES, MAX_TEXT_CHARS, SERVING_FILE,
                                     DeploymentError, InferenceRequest, ServedModel, ServeSettings,
                                     check_sequences, create_app, default_sequence_lengths, prepare,
                                     read_serving_info, unwrap_single_texts, write_server_config)
from sparsebert.errors import UserError

NAME = "rte"
PAIR = [["A man is playing a guitar on stage.", "A man is making music."]]
# What export writes for the tiny RTE run; written here for a deployment exported without it.
RTE_SERVING = {"task": "rte", "text_inputs": 2, "regression": False, "sequence_length": 128}
PAIRS_ONLY = "this model (rte) reads sentence pairs: send [[sentence1, sentence2], ...]"


def write_serving_json(folder: Path, **info) -> None:
    (folder / SERVING_FILE).write_text(json.dumps(info))


@pytest.fixture(scope="session")
def deployment(exported_run, tmp_path_factory) -> Path:
    """A copy of the sparse student of the shared tiny run (tests/conftest.py), serving.json
    included as export wrote it (the shared run's own folder is left untouched)."""
    copy = tmp_path_factory.mktemp("deployment") / "deployment"
    shutil.copytree(exported_run / "export" / "student" / "deployment", copy)
    assert read_serving_info(copy) == RTE_SERVING  # what `sparsebert export` wrote
    return copy


@pytest.fixture(scope="session")
def original_digest(deployment) -> str:
    return hashlib.sha256((deployment / "model.onnx").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def label_names(deployment) -> set[str]:
    return set(json.loads((deployment / "config.json").read_text())["id2label"].values())


@dataclass
class Server:
    url: str
    engine: str
    workdir: Path

    @property
    def infer(self) -> str:
        return f"{self.url}/v2/models/{NAME}/infer"


@pytest.fixture(scope="module", params=["deepsparse", "onnxruntime"])
def server(request, deployment, original_digest, tmp_path_factory):
    """One server process per engine (started, used by this module's tests, then stopped)."""
    from sparsebert.deploy.soak import server_process

    engine = request.param
    workdir = tmp_path_factory.mktemp(f"serve-{engine}")
    with server_process(deployment, engine, workdir, None, workdir / "server.log", name=NAME) as (_, client):
        yield Server(client.url, engine, workdir)


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


def test_sentence_pair(server, label_names):
    status, answer = post(server.infer, as_json({"sequences": PAIR}))
    assert status == 200
    assert_predictions(answer, 1, label_names)


def test_batch_of_pairs_answers_each_pair_as_alone(server, label_names):
    pairs = [["The cat sat on the mat.", "A cat is sitting."], ["Stocks fell sharply.", "Prices rose."]]
    status, batch = post(server.infer, as_json({"sequences": pairs}))
    assert status == 200
    assert_predictions(batch, 2, label_names)
    alone = [post(server.infer, as_json({"sequences": [pair]}))[1] for pair in pairs]
    assert batch["labels"] == [answer["labels"][0] for answer in alone]
    assert batch["scores"] == pytest.approx([answer["scores"][0] for answer in alone], abs=1e-5)


@pytest.mark.parametrize("sequences", ["A man is playing a guitar.", ["The cat sat.", "Stocks fell."],
                                       [["The cat sat."], ["Stocks fell."]]], ids=["text", "texts", "wrapped"])
def test_single_texts_to_a_pair_model_get_422(server, sequences):
    assert post(server.infer, as_json({"sequences": sequences})) == (422, {"error": PAIRS_ONLY})


def largest_request(text: str) -> dict:
    """The largest request the limits allow: MAX_SEQUENCES pairs of MAX_TEXT_CHARS-long texts."""
    text = (text * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS]
    return {"sequences": [[text, text]] * MAX_SEQUENCES}


def test_largest_valid_request_fits_however_encoded(server, label_names):
    """Non-Latin text and emoji, sent as UTF-8 by our client and \\u-escaped (json.dumps'
    default, 12 bytes an emoji): neither may exceed the body limit. Its words are over 100
    characters, one [UNK] each, so the test measures the body limit, not the tokenizer (whose
    truncation of long pairs takes seconds)."""
    request = largest_request("Ωмир😀🎸" * 24 + " ")
    predictions = SparseBertClient(server.url, NAME, timeout=120).classify(request["sequences"])
    assert len(predictions.labels) == MAX_SEQUENCES and set(predictions.labels) <= label_names
    escaped = json.dumps(request).encode()
    assert escaped.isascii() and len(escaped) > 3 << 20  # three times the 1 MiB limit that was
    status, answer = post(server.infer, escaped)
    assert status == 200 and answer["labels"] == predictions.labels


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
    ("invisible-in-pair", as_json({"sequences": [["\u200b\u200c\u200d\ufeff", "a"]]}), "application/json", None,
     400, "sequences[0][0] is empty"),
    ("empty-list", as_json({"sequences": []}), "application/json", None, 400, "empty list"),
    ("text-too-long", as_json(TOO_LONG), "application/json", None, 400, f"limit is {MAX_TEXT_CHARS:,}"),
    ("body-too-large", as_json({"sequences": "x" * MAX_BODY_BYTES}), "application/json", None, 413, "limit"),
    ("nested-20000-deep", b'{"sequences": ' + b"[" * 20000 + b"]" * 20000 + b"}", "application/json", None, 400,
     "nested too deeply"),
    ("integer-of-5000-digits", b'{"sequences": ' + b"7" * 5000 + b"}", "application/json", None, 400,
     "malformed JSON"),
    ("nested-500-deep", as_json({"sequences": functools.reduce(lambda inner, _: [inner], range(500), "a")}),
     "application/json", None, 400, "sequences"),
    ("text-plain", b"a text", "text/plain", None, 415, "application/json"),
    ("form-encoded", as_json({"sequences": "hi"}), "application/x-www-form-urlencoded", None, 415, "Content-Type"),
    ("unknown-model", as_json({"sequences": PAIR}), "application/json", "/v2/models/nope/infer", 404, "nope"),
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
    assert report["inputs"] == sum(isinstance(item[0], list) for item in INPUTS if isinstance(item, list))
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


# ---------------------------------------------------------------- files


def test_config_is_a_deepsparse_server_config_for_the_copy(server, deployment):
    from deepsparse.server.config import ServerConfig

    config = ServerConfig(**yaml.safe_load((server.workdir / "server.yaml").read_text()))
    (endpoint,) = config.endpoints
    assert (endpoint.name, endpoint.route, endpoint.task) == (NAME, f"/{NAME}", "text_classification")
    assert endpoint.kwargs == {"engine_type": pipeline_engine_type(server.engine)}
    assert endpoint.to_pipeline_config().engine_type == server.engine
    assert Path(endpoint.model) == (server.workdir / "model").resolve() != deployment.resolve()
    exported_length = read_serving_info(deployment)["sequence_length"]
    assert endpoint.bucketing.sequence_lengths == list(default_sequence_lengths(exported_length))


def test_original_deployment_is_not_rewritten(server, deployment, original_digest):
    assert hashlib.sha256((deployment / "model.onnx").read_bytes()).hexdigest() == original_digest


# ---------------------------------------------------------------- without a server


@pytest.mark.parametrize("sequences", ["a", ["a", "b"], [["a", "b"]], [["a"], ["b"]], "a\u200b", "\u200bb", "e\u0301"])
def test_accepted_sequences(sequences):
    check_sequences(sequences)


@pytest.mark.parametrize("text", ["\u200b", "\u200c\u200d", "\ufeff", " \u00a0\u2028\u3000\t\n", "\u2060\x00",
                                  "\u0301", "\u034f", "\ue000", "\ufffd", "\ud800"])
def test_invisible_text_is_blank(text, deployment):
    """Zero-width spaces, joiners, BOMs, controls, separators, lone accents, private use, U+FFFD,
    lone surrogates: the served model's tokenizer reads nothing in them, and they are refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment)
    assert tokenizer(text)["input_ids"] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    with pytest.raises(ValueError, match="sequences is empty"):
        check_sequences(text)


def test_wrapped_single_texts_are_unwrapped():
    assert unwrap_single_texts([["a"], ["b"]]) == ["a", "b"]
    assert unwrap_single_texts([["a", "b"]]) == [["a", "b"]]


def test_largest_valid_request_fits_fully_escaped():
    """Every character astral and \\u-escaped (12 bytes), indented: still within the body limit."""
    body = json.dumps(largest_request("\U0001F600"), indent=4).encode()
    assert len(body) <= MAX_BODY_BYTES
    assert len(body) > MAX_BODY_BYTES * 0.9  # the limit is not far above what it must allow


def served_model(tmp_path: Path, **serving) -> ServedModel:
    """A ServedModel (not loaded) whose model folder has ``serving`` as its serving.json."""
    (tmp_path / "model").mkdir()
    if serving:
        write_serving_json(tmp_path / "model", **serving)
    return ServedModel(write_server_config(tmp_path, tmp_path / "model", ServeSettings(name="sst2")))


def test_single_text_model_refuses_pairs(tmp_path):
    model = served_model(tmp_path, task="sst2", text_inputs=1, regression=False, sequence_length=128)
    for sequences in ("a", ["a", "b"], [["a"], ["b"]]):
        model.check_text_inputs(InferenceRequest(sequences=sequences))
    with pytest.raises(UnprocessableInput, match=r"^this model \(sst2\) reads single texts: send "):
        model.check_text_inputs(InferenceRequest(sequences=[["a", "b"]]))


@pytest.mark.parametrize("serving", [{}, {"task": "glue", "text_inputs": None}], ids=["no-file", "null"])
def test_unknown_text_inputs_accept_both(tmp_path, serving):
    model = served_model(tmp_path, **serving)
    for sequences in ("a", ["a", "b"], [["a"], ["b"]], [["a", "b"]]):
        model.check_text_inputs(InferenceRequest(sequences=sequences))


@pytest.mark.parametrize("info", [{"text_inputs": 3}, {"sequence_length": "128"}, ["rte"]])
def test_bad_serving_json_is_refused(tmp_path, info):
    (tmp_path / SERVING_FILE).write_text(json.dumps(info))
    with pytest.raises(DeploymentError, match=SERVING_FILE):
        read_serving_info(tmp_path)


def test_settings_reject_unknown_engine_and_bad_name():
    with pytest.raises(DeploymentError, match="engine"):
        ServeSettings(engine="tensorrt")
    with pytest.raises(DeploymentError, match="name"):
        ServeSettings(name="a/b")


def fake_deployment(folder: Path, **serving) -> Path:
    """A folder that passes check_deployment (empty model and tokenizer files)."""
    folder.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (folder / name).write_text("")
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "entailment", "1": "not_entailment"},
                                                    "max_position_embeddings": 512}))
    if serving:
        write_serving_json(folder, **serving)
    return folder


def test_prepare_refuses_to_overwrite_the_deployment(tmp_path):
    folder = fake_deployment(tmp_path / "model")  # the copy would go to <workdir>/model: the folder itself
    with pytest.raises(DeploymentError, match="overwrite"):
        prepare(folder, tmp_path, ServeSettings(name=NAME))
    assert (folder / "model.onnx").is_file()


@pytest.mark.parametrize("exported, explicit, buckets", [
    (256, None, [64, 128, 256]), (128, None, [64, 128]), (64, None, [64]), (96, None, [64, 96]),
    (None, None, [64, 128]), (256, (32, 128), [32, 128])])
def test_buckets_stop_at_the_exported_length(tmp_path, exported, explicit, buckets):
    """Texts are truncated at the length parity was measured with; --sequence-lengths still wins."""
    serving = {"task": "mrpc", "text_inputs": 2, "sequence_length": exported} if exported else {}
    folder = fake_deployment(tmp_path / "deployment", **serving)
    config = prepare(folder, tmp_path / "work", ServeSettings(name=NAME, sequence_lengths=explicit))
    endpoint = yaml.safe_load(config.read_text())["endpoints"][0]
    assert endpoint["bucketing"]["sequence_lengths"] == buckets


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


# ---------------------------------------------------------------- dynamic batching (stand-in engine)


class StandInPipeline:
    """A pipeline that answers each text with a label and score of its own, records every call,
    runs ``during_call`` (if set) inside each call, and raises ``error`` for a call holding
    ``fail_on``."""

    def __init__(self, fail_on=None, error: type[BaseException] = RuntimeError):
        self.calls, self.fail_on, self.error, self.during_call = [], fail_on, error, None

    def __call__(self, sequences):
        self.calls.append(list(sequences))
        if self.during_call:
            self.during_call()
        if self.fail_on in sequences:
            raise self.error("engine failed")
        return SimpleNamespace(labels=[f"label of {text}" for text in sequences],
                               scores=[len(text) / 100 for text in sequences])


def alone(texts: list[str]) -> dict:
    return {"labels": [f"label of {text}" for text in texts], "scores": [len(text) / 100 for text in texts]}


def stand_in_model(tmp_path, monkeypatch, pipeline: StandInPipeline, batch_size: int, window_ms: float,
                   request_timeout_s: float = 30.0) -> ServedModel:
    """A ServedModel on ``pipeline``, loaded (its warm-up calls not counted)."""
    from sparsebert.deploy import serve

    monkeypatch.setattr(serve, "load_pipeline", lambda config_path: pipeline)
    (tmp_path / "model").mkdir()
    settings = ServeSettings(name=NAME, batch_size=batch_size)
    model = ServedModel(write_server_config(tmp_path, tmp_path / "model", settings), batch_window_ms=window_ms,
                        request_timeout_s=request_timeout_s)
    model.load()
    pipeline.calls.clear()
    return model


def all_at_once(ask, requests: list) -> list:
    """``ask(request)`` for each request, all at once from threads of their own; the answers (or
    exceptions) in order. A request never answered fails the test instead of hanging it."""
    answers = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i):
        start.wait()
        try:
            answers[i] = ask(requests[i])
        except Exception as error:  # noqa: BLE001 - the test compares it
            answers[i] = error

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive(), "a request was never answered"
    return answers


def ask_together(model: ServedModel, requests: list) -> list:
    return all_at_once(lambda sequences: model.predict(InferenceRequest(sequences=sequences)), requests)


def test_concurrent_requests_share_engine_calls(tmp_path, monkeypatch):
    """8 one-text requests at once, batch 8: fewer engine calls than requests (one a request
    before dynamic batching), and each request gets its own text's answer."""
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=8, window_ms=500)
    texts = [f"text {i}" for i in range(8)]
    answers = ask_together(model, texts)
    assert answers == [alone([text]) for text in texts]
    assert len(pipeline.calls) < 8
    assert sorted(text for call in pipeline.calls for text in call) == texts


def test_a_request_larger_than_the_batch_is_split_and_answered_in_order(tmp_path, monkeypatch):
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=4, window_ms=0)
    texts = [f"text {i}" for i in range(10)]
    assert model.predict(InferenceRequest(sequences=texts)) == alone(texts)
    assert pipeline.calls == [texts[0:4], texts[4:8], texts[8:10]]


def test_the_batch_size_is_never_exceeded(tmp_path, monkeypatch):
    """Requests of 1 to 7 texts at once, batch 3: every call holds at most 3 texts, every text is
    sent once, and each request gets its own answers in its own order."""
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=3, window_ms=20)
    requests = [[f"request {r} text {i}" for i in range(r % 7 + 1)] for r in range(12)]
    assert ask_together(model, requests) == [alone(texts) for texts in requests]
    assert all(1 <= len(call) <= 3 for call in pipeline.calls)
    assert sorted(text for call in pipeline.calls for text in call) == sorted(sum(requests, []))
    assert len(pipeline.calls) < sum(-(-len(texts) // 3) for texts in requests)  # fewer than unshared


def test_single_texts_and_pairs_never_share_a_call(tmp_path, monkeypatch):
    """A deployment without text_inputs accepts both kinds; the tokenizer reads one kind a call."""
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=8, window_ms=200)
    requests = ["one text", [["a", "pair"]], ["two", "texts"], [["another", "pair"], ["and", "one more"]]]
    assert [answer["labels"] for answer in ask_together(model, requests)] == [
        ["label of one text"], ["label of ['a', 'pair']"], ["label of two", "label of texts"],
        ["label of ['another', 'pair']", "label of ['and', 'one more']"]]
    kinds = [{isinstance(row, list) for row in call} for call in pipeline.calls]
    assert sorted(map(sorted, kinds)) == [[False], [True]]  # two calls, one of each kind


def test_an_engine_error_fails_only_the_faulty_request(tmp_path, monkeypatch):
    """A failing shared call is answered again one request at a time: only the request with the
    faulty input fails, with the error shape, the others get their answers, and nothing hangs;
    the server answers the next requests."""
    from fastapi.testclient import TestClient

    pipeline = StandInPipeline(fail_on="poison")
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=4, window_ms=500)
    answers = ask_together(model, [["poison"], "b", "c", "d"])
    assert isinstance(answers[0], RuntimeError)
    assert answers[1:] == [alone(["b"]), alone(["c"]), alone(["d"])]
    assert len(pipeline.calls[0]) == 4  # shared, then each request alone
    assert sorted(pipeline.calls[1:]) == [["b"], ["c"], ["d"], ["poison"]]
    assert model.predict(InferenceRequest(sequences="fine")) == alone(["fine"])

    with TestClient(create_app(model), raise_server_exceptions=False) as client:  # answers, not raises
        statuses = ask_over_http(client, [["poison"], "b"])
        assert statuses == [(500, {"error": "internal error (RuntimeError); see the server log"}), (200, alone(["b"]))]
        assert client.post(f"/v2/models/{NAME}/infer", json={"sequences": "fine"}).json() == alone(["fine"])


def ask_over_http(client, requests: list) -> list:
    def ask(sequences):
        response = client.post(f"/v2/models/{NAME}/infer", json={"sequences": sequences})
        return response.status_code, response.json()

    return all_at_once(ask, requests)


def test_a_small_request_waits_for_one_batch_of_a_large_one(tmp_path, monkeypatch):
    """A large request's texts are split across calls that take turns with other requests: a
    one-text request sent while a 12-text one is being answered shares the next call, rather
    than waiting for all of it, and each request gets its own answers in its own order."""
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=2, window_ms=0)

    def hold_until_the_small_one_waits():  # the large request's first call
        if len(pipeline.calls) == 1:
            deadline = time.monotonic() + 10
            while model.batcher.arrivals() < 1 and time.monotonic() < deadline:
                time.sleep(0.001)

    pipeline.during_call = hold_until_the_small_one_waits
    large = [f"text {i}" for i in range(12)]
    answers = {}

    def ask(name, sequences):
        answers[name] = model.predict(InferenceRequest(sequences=sequences))

    worker = threading.Thread(target=ask, args=("large", large), daemon=True)
    worker.start()
    while not pipeline.calls:
        time.sleep(0.001)
    ask("small", "the small one")  # queued while the large one's first call is answered
    worker.join(10)
    assert not worker.is_alive()
    assert answers["large"] == alone(large)  # split, in order
    assert answers["small"] == alone(["the small one"])
    # Answered by the call right after the large one's first, of the 7 calls in all.
    assert pipeline.calls[:2] == [large[:2], ["the small one", large[2]]]
    assert len(pipeline.calls) == 7 and all(len(call) <= 2 for call in pipeline.calls)


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_close_ends_the_batcher_thread_and_fails_a_waiting_request(tmp_path, monkeypatch):
    """A request waiting for company when the model is closed gets ModelNotReady (503) instead
    of hanging; the thread ends and later requests are refused. A second load() replaces the
    batcher rather than starting another beside it."""
    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=8, window_ms=1000)
    first = model.batcher
    model.load()
    assert not first.thread.is_alive() and model.batcher.thread.is_alive()
    batcher, pipeline.calls[:] = model.batcher, []
    waiting = model.submit(InferenceRequest(sequences="a text"))
    wait_until(lambda: batcher.arrivals() == 0)  # taken up: waiting out its 1 s window
    model.close()
    assert isinstance(waiting.exception(timeout=5), ModelNotReady)
    assert not batcher.thread.is_alive() and pipeline.calls == []
    with pytest.raises(ModelNotReady):
        model.predict(InferenceRequest(sequences="too late"))


def batcher_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "batcher"]


def test_servers_close_their_model_when_they_stop(tmp_path, monkeypatch):
    """The app on shutdown, and local_server on leaving: no batcher thread is left behind."""
    from fastapi.testclient import TestClient

    from sparsebert.deploy import serve

    model = stand_in_model(tmp_path, monkeypatch, StandInPipeline(), batch_size=4, window_ms=0)
    with TestClient(create_app(model)) as client:
        assert client.get("/v2/health/ready").json() == {"status": "OK"}
        batcher = model.batcher
    assert not batcher.thread.is_alive() and model.batcher is None

    before = batcher_threads()
    monkeypatch.setattr(serve, "load_pipeline", lambda config_path: StandInPipeline())
    with local_server(fake_deployment(tmp_path / "deployment"), "onnxruntime", tmp_path / "work",
                      batch_size=4) as client:
        assert client.classify("a text").labels == ["label of a text"]
        assert len(batcher_threads()) == len(before) + 1
    assert batcher_threads() == before


def test_an_engine_raising_system_exit_fails_every_waiting_request(tmp_path, monkeypatch):
    """SystemExit from the engine ends the batcher thread: the request in the call and those
    waiting behind it get errors instead of hanging, and the model stops reading as ready."""
    pipeline = StandInPipeline(fail_on="exit", error=SystemExit)
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0)
    pipeline.during_call = lambda: wait_until(lambda: model.batcher.arrivals() == 2)
    in_the_call = model.submit(InferenceRequest(sequences="exit"))
    wait_until(lambda: pipeline.calls)
    behind = [model.submit(InferenceRequest(sequences=text)) for text in ("b", "c")]
    assert isinstance(in_the_call.exception(timeout=10), RuntimeError)  # not SystemExit: the loop would stop
    assert all(isinstance(future.exception(timeout=10), ModelNotReady) for future in behind)
    assert pipeline.calls == [["exit"]]
    with pytest.raises(ModelNotReady, match="SystemExit"):
        model.require_ready()


LONG = "The committee, after hearing several hours of testimony from residents, decided to postpone the vote. "


def numbered(shapes: list[list[list[str]]]) -> list[list[list[str]]]:
    """The requests of ``shapes`` with every pair made unique ("(request.row)" appended to its
    second text), so a call's rows tell which requests they came from."""
    return [[[first, f"{second} ({r}.{i})"] for i, (first, second) in enumerate(shape)]
            for r, shape in enumerate(shapes)]


def recorded_calls(model: ServedModel) -> list[list]:
    """The rows of every engine call the model's batcher makes from now on."""
    calls, answer_rows = [], model.batcher.answer_rows

    def recording(rows):
        calls.append(list(rows))
        return answer_rows(rows)

    model.batcher.answer_rows = recording
    return calls


def loaded_model(deployment: Path, workdir: Path, engine: str, batch_size: int) -> ServedModel:
    config = prepare(deployment, workdir, ServeSettings(name=NAME, engine=engine, batch_size=batch_size))
    model = ServedModel(config, batch_window_ms=200)  # long enough for every request to arrive
    model.load()
    return model


@pytest.mark.parametrize("engine", ["deepsparse", "onnxruntime"])
def test_shared_calls_answer_as_the_pipeline_does_one_text_at_a_time(deployment, tmp_path, engine):
    """The tiny RTE student at batch 4 with buckets 64 and 128: concurrent requests (pairs short
    and long, one request larger than the batch) share calls, at least one holding pairs of
    several requests of both buckets (a short pair in the 128-token call of a long one); each
    gets the answers of a batch-1 server asked one request at a time, and of the pipeline asked
    one pair at a time, to float error."""
    from transformers import AutoTokenizer

    model = loaded_model(deployment, tmp_path / "batch4", engine, batch_size=4)
    assert [bucket.sequence_length for bucket in model.pipeline._pipelines] == [64, 128]
    # about 15, 70 and 231 tokens: buckets 64, 128, and 128 truncating
    short, medium, long = ["A man eats.", "Someone eats."], [LONG * 3, "The vote was postponed."], [LONG * 8, LONG * 4]
    requests = numbered([[short], [medium, short], [long], [short, medium, long, short, medium], [medium], [short]])
    calls = recorded_calls(model)
    answers = ask_together(model, requests)

    owner = {tuple(pair): r for r, pairs in enumerate(requests) for pair in pairs}
    tokenizer = AutoTokenizer.from_pretrained(deployment)
    fits_64 = {tuple(pair): len(tokenizer(*pair)["input_ids"]) <= 64 for pairs in requests for pair in pairs}
    assert any(len({owner[tuple(pair)] for pair in call}) > 1 and {fits_64[tuple(pair)] for pair in call} == {True, False}
               for call in calls), calls

    unbatched = loaded_model(deployment, tmp_path / "batch1", engine, batch_size=1)
    for pairs, answer in zip(requests, answers):
        alone = unbatched.predict(InferenceRequest(sequences=pairs))
        one_by_one = [model.pipeline(sequences=[pair]) for pair in pairs]
        assert answer["labels"] == alone["labels"] == [str(output.labels[0]) for output in one_by_one]
        assert answer["scores"] == pytest.approx(alone["scores"], abs=1e-5)
        assert answer["scores"] == pytest.approx([output.scores[0] for output in one_by_one], abs=1e-5)
    model.close()
    unbatched.close()


@pytest.mark.parametrize("batch_size, window_ms, shortest_s, longest_s", [(1, 1000, 0, 0.5), (4, 50, 0.04, 0.5)],
                         ids=["batch-1", "batch-4"])
def test_a_lone_request_waits_at_most_the_window(tmp_path, monkeypatch, batch_size, window_ms, shortest_s, longest_s):
    """At batch 1 a request is a full batch and waits for no one, however long the window; above
    batch 1 a lone request is sent once the window is over."""
    model = stand_in_model(tmp_path, monkeypatch, StandInPipeline(), batch_size, window_ms)
    start = time.monotonic()
    assert model.predict(InferenceRequest(sequences="alone")) == alone(["alone"])
    assert shortest_s <= time.monotonic() - start < longest_s
    model.close()


@pytest.mark.parametrize("window_ms", [-1, 1001, float("nan")])
def test_a_bad_batch_window_is_refused(window_ms):
    with pytest.raises(DeploymentError, match="batch window"):
        ServeSettings(batch_window_ms=window_ms)


@pytest.mark.parametrize("text_inputs", [1, 2])
def test_a_model_is_ready_only_once_it_answered_a_warm_up(tmp_path, monkeypatch, text_inputs):
    from sparsebert.deploy import serve
    from sparsebert.deploy.errors import ModelNotReady

    calls = []

    def pipeline(sequences):
        calls.append(sequences)
        if fail:
            raise RuntimeError("engine failed")

    monkeypatch.setattr(serve, "load_pipeline", lambda config_path: pipeline)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / SERVING_FILE).write_text(json.dumps({"task": "rte", "text_inputs": text_inputs}))
    model = ServedModel(write_server_config(tmp_path, tmp_path / "model", ServeSettings(name=NAME)))
    fail = True
    with pytest.raises(RuntimeError):
        model.load()
    with pytest.raises(ModelNotReady):
        model.require_ready()  # its warm-up failed: never ready
    fail = False
    model.load()
    model.require_ready()
    assert len(calls) == 2 and all(isinstance(s, list) and len(s) == 1 for s in calls)
    assert all(len(s[0]) == 2 if text_inputs == 2 else isinstance(s[0], str) for s in calls)  # the model's own kind


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


# ---------------------------------------------------------------- long texts, deadlines, shutdown


def test_served_and_parity_texts_are_cut_alike(tmp_path, monkeypatch):
    """A text past the character bound reaches the pipeline cut, at the bound of the server's
    longest bucket (128 here), and parity's encoder cuts it at the same place: it encodes the
    long text exactly as the cut one."""
    from transformers import AutoTokenizer

    from sparsebert import inference
    from sparsebert.models import embedded_default

    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0)
    limit = inference.char_limit(128)
    assert model.sequence_length == 128 and limit < MAX_TEXT_CHARS
    long = "word " * (limit // 5) + "tail " * 50  # the tail lies past the bound
    model.predict(InferenceRequest(sequences=[[long, "short"]]))
    assert pipeline.calls == [[[long[:limit], "short"]]] and inference.cut_text(long, 128) == long[:limit]

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_default()))
    spaced = "a few words" + " " * limit + " and words the tokenizer would read uncut"
    encoded = {text: inference.encode(tokenizer, [{"sentence1": text, "sentence2": "b"}], ["input_ids"], 128, True)
               for text in (spaced, spaced[:limit])}
    assert (encoded[spaced]["input_ids"] == encoded[spaced[:limit]]["input_ids"]).all()
    uncut = tokenizer(spaced, "b", truncation=True, max_length=128, padding="max_length")["input_ids"]
    assert uncut != encoded[spaced]["input_ids"][0].tolist()  # the cut is what made them equal


@pytest.mark.parametrize("bucketing, kwargs, expected", [
    ([64, 128], {}, 128), ([64, 128, 256], {}, 256), ([64, 128], {"sequence_length": 256}, 256),
    (None, {"sequence_length": [32, 512]}, 512), (None, {}, 128)])
def test_texts_are_cut_for_the_length_the_pipeline_truncates_at(tmp_path, bucketing, kwargs, expected):
    """A config given with --config may set the pipeline's sequence_length in its kwargs, which
    deepsparse.server lets override the bucketing: the cut follows what the pipeline reads."""
    from deepsparse.server.config import EndpointConfig

    (tmp_path / "model").mkdir()
    path = write_server_config(tmp_path, tmp_path / "model", ServeSettings(name=NAME))
    config = yaml.safe_load(path.read_text())
    endpoint = config["endpoints"][0]
    endpoint.pop("bucketing")
    if bucketing:
        endpoint["bucketing"] = {"sequence_lengths": bucketing}
    endpoint["kwargs"].update(kwargs)
    path.write_text(yaml.safe_dump(config))
    read = EndpointConfig(**endpoint).to_pipeline_config().kwargs.get("sequence_length", 128)
    assert max(read if isinstance(read, list) else [read]) == expected  # what deepsparse builds
    assert ServedModel(path).sequence_length == expected


def test_a_text_blank_where_it_is_cut_is_refused(tmp_path, monkeypatch):
    """Its words lie past the bound, so the model would read nothing: 400, nothing sent."""
    from fastapi.testclient import TestClient

    from sparsebert import inference

    pipeline = StandInPipeline()
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0)
    late = " \u200b" * (inference.char_limit(128) // 2) + "words"
    with TestClient(create_app(model)) as client:
        response = client.post(f"/v2/models/{NAME}/infer", json={"sequences": [["a", late]]})
    assert response.status_code == 400 and "nothing to read in its first 1,024 characters" in response.json()["error"]
    assert pipeline.calls == []


class HeldPipeline(StandInPipeline):
    """A stand-in whose calls holding ``hold_on`` wait until ``release`` is set."""

    def __init__(self, hold_on: str):
        super().__init__()
        self.release, self.held = threading.Event(), threading.Event()
        self.during_call = self._hold
        self.hold_on = hold_on

    def _hold(self):
        if self.hold_on in self.calls[-1]:
            self.held.set()
            assert self.release.wait(20), "never released"


def in_background(function, *args) -> dict:
    """Run ``function(*args)`` on a thread; the dict gets its "result" and the thread ("thread")."""
    out = {}

    def run():
        out["result"] = function(*args)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_a_request_past_its_deadline_gets_504_and_its_other_texts_are_dropped(tmp_path, monkeypatch):
    """With a 0.3 s deadline, a request whose first text holds the engine is answered 504 in the
    error shape at its deadline, while the engine call is still running; its two other texts are
    never sent, and the next request is answered."""
    from fastapi.testclient import TestClient

    pipeline = HeldPipeline(hold_on="slow")
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0, request_timeout_s=0.3)
    with TestClient(create_app(model)) as client:
        start = time.monotonic()
        response = client.post(f"/v2/models/{NAME}/infer", json={"sequences": ["slow", "second", "third"]})
        waited = time.monotonic() - start
        assert pipeline.held.is_set()  # answered while the engine was still busy with it
        pipeline.release.set()
        assert response.status_code == 504 and list(response.json()) == ["error"]
        assert "did not answer within 0.3 s" in response.json()["error"]
        assert 0.3 <= waited < 5
        assert client.post(f"/v2/models/{NAME}/infer", json={"sequences": "next"}).json() == alone(["next"])
    assert pipeline.calls == [["slow"], ["next"]]


def test_draining_refuses_new_requests_and_answers_those_in_flight(tmp_path, monkeypatch):
    """After drain() (a shutdown signal) a request in flight still gets its answer; new requests
    and the readiness probe get 503 in the error shape."""
    from fastapi.testclient import TestClient

    pipeline = HeldPipeline(hold_on="in flight")
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0)
    with TestClient(create_app(model)) as client:
        infer = f"/v2/models/{NAME}/infer"
        in_flight = in_background(functools.partial(client.post, infer, json={"sequences": "in flight"}))
        assert pipeline.held.wait(10)
        model.drain()
        for response in (client.post(infer, json={"sequences": "new"}), client.get("/v2/health/ready")):
            assert response.status_code == 503 and response.json() == {"error": f"model '{NAME}' is shutting down"}
        pipeline.release.set()
        in_flight["thread"].join(10)
        assert in_flight["result"].status_code == 200 and in_flight["result"].json() == alone(["in flight"])
    assert pipeline.calls == [["in flight"]]


def test_a_shutdown_signal_lets_the_request_in_flight_finish(tmp_path, monkeypatch):
    """The real uvicorn server told to exit (SIGTERM's handler) while a request is in the engine:
    it keeps running until that request is answered (200, its own answer), answers no new one,
    then stops and closes the model."""
    import signal

    import uvicorn

    from sparsebert.deploy.serve import DrainingServer

    pipeline = HeldPipeline(hold_on="in flight")
    model = stand_in_model(tmp_path, monkeypatch, pipeline, batch_size=1, window_ms=0)
    port = free_port()
    server = DrainingServer(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"), model)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    infer = f"http://127.0.0.1:{port}/v2/models/{NAME}/infer"
    in_flight = in_background(post, infer, as_json({"sequences": "in flight"}))
    assert pipeline.held.wait(10)
    server.handle_exit(signal.SIGTERM, None)
    try:
        status = post(infer, as_json({"sequences": "new"}))[0]
    except urllib.error.URLError:  # uvicorn has closed its socket: refused, as it should be
        status = None
    assert status in (503, None)
    time.sleep(0.5)
    assert thread.is_alive() and not in_flight["thread"].join(0) and "result" not in in_flight
    pipeline.release.set()
    in_flight["thread"].join(10)
    assert in_flight["result"] == (200, alone(["in flight"]))
    thread.join(10)
    assert not thread.is_alive() and model.batcher is None  # stopped, and the model closed
    assert pipeline.calls == [["in flight"]]


def test_soak_rss_growth_is_measured_from_the_end_of_the_warm_up():
    """Growth counts from the first sample at or after the warm-up, not from the cold start,
    and this process's own RSS reads as a positive size."""
    import os

    from sparsebert.deploy.soak import MAX_RSS_GROWTH, rss_mib, rss_summary

    samples = [(0.0, 500.0), (30.0, 800.0), (60.0, 900.0), (300.0, 950.0), (600.0, 990.0)]
    summary = rss_summary(samples, warm_up_s=60.0)
    assert (summary["first_mib"], summary["after_warm_up_mib"], summary["max_mib"], summary["last_mib"]) == (
        500.0, 900.0, 990.0, 990.0)
    assert summary["growth_after_warm_up"] == pytest.approx(0.1) and not summary["growth_after_warm_up"] < MAX_RSS_GROWTH
    assert rss_summary([(0.0, 100.0), (5.0, 104.0)], warm_up_s=60.0)["growth_after_warm_up"] == 0.0  # too short: last
    assert rss_mib(os.getpid()) > 1


def test_soak_sampling_a_server_that_exited_stops_with_a_reason_not_a_crash():
    """A server process that died mid-soak (exited, not yet waited for: /proc has no VmRSS for
    it) ends the sampling with a UserError's reason, not a StopIteration from the sampler."""
    from sparsebert.deploy.soak import RssSampler, rss_mib

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: Path(f"/proc/{process.pid}/stat").read_text().split(")")[-1].split()[0] == "Z")
        with pytest.raises(UserError, match="has exited"):
            rss_mib(process.pid)
        sampler = RssSampler(process.pid, every_s=0.01)
        sampler.start()
        sampler.stop()
        assert sampler.samples == [] and "has exited" in sampler.failed
    finally:
        process.wait()
