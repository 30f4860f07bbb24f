"""The server on a real (tiny) model, in this process, against what clients may send: 1,200
seeded random bodies (JSON of every shape, type, size, encoding and nesting depth, broken bytes,
wrong content types) each answered 2xx or 4xx in the project's error shape, and the same answer
as before for a good request afterwards; a text past the character bound answered as its cut,
as parity reads it; a small request answered while the largest valid one is in flight."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from tiny import tiny_task_checkpoint

from sparsebert import glue, inference
from sparsebert.deploy.export import export_and_check
from sparsebert.deploy.serve import (MAX_BODY_BYTES, MAX_SEQUENCES, MAX_TEXT_CHARS, InferenceRequest, ServedModel,
                                     ServeSettings, create_app, prepare)

NAME = "fuzz"
LENGTH = 32  # exported length: texts are cut at inference.char_limit(32) characters
BODIES = 1200
SEED = 19
PAIR = [["A man is playing a guitar on stage.", "A man is making music."]]
ALPHABETS = ["abcdefghij klmnop", "The quick brown fox, 1234!?", "汉字测试文本中文句子", "Ωμέγα мир ελληνικά",
             "😀🎸👍🏽", "e\u0301\u034f\u200b\u200d\ufeff", "\x00\x01\x1f\x7f\t\n", "\ud800\udfff\udc00",
             "\"\\/{}[]:,", "\u202e\u2028\u3000\ue000\ufffd"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/vnd.api+json",
                 "text/plain", "application/x-www-form-urlencoded", None]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, TestClient, label names) of a tiny RTE model exported at 32 tokens, on DeepSparse."""
    from fastapi.testclient import TestClient

    task = glue.get_task("rte")
    folder = tmp_path_factory.mktemp("fuzz")
    checkpoint = tiny_task_checkpoint(task, folder / "checkpoint")
    export_and_check(checkpoint, folder / "export", LENGTH, task=task)
    deployment = folder / "export" / "deployment"
    config = prepare(deployment, folder / "work", ServeSettings(name=NAME, engine="deepsparse"))
    model = ServedModel(config)
    model.load()
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        yield model, client, checkpoint, deployment
    model.close()


# ---------------------------------------------------------------- random bodies


READABLE = ALPHABETS[:5]  # a text of these is never blank


def random_text(rng: random.Random, alphabets: list[str] = ALPHABETS) -> str:
    length = rng.choice([1, 3, 20, 200, 1000, MAX_TEXT_CHARS] + ([0, MAX_TEXT_CHARS + 1] if alphabets == ALPHABETS else []))
    alphabet = rng.choice(alphabets)
    chunk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
    return (chunk * (length // len(chunk) + 1))[:length]  # repeated: 1,200 bodies stay fast to build


def random_number(rng: random.Random):
    return rng.choice([0, -1, 2**63, 1.5, -1e308, float("nan"), float("inf"), True])


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["text", "number", "null", "list", "dict"] if depth < 4 else ["text", "number", "null"])
    if kind == "text":
        return random_text(rng)
    if kind == "number":
        return random_number(rng)
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 3, 65]))]
    return {random_text(rng)[:20]: random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def plausible_sequences(rng: random.Random):
    """What a client would send, right or nearly: a text, texts or pairs, of any size."""
    count = rng.choice([1, 2, 16, MAX_SEQUENCES, MAX_SEQUENCES + 1])
    shape = rng.choice(["text", "texts", "pairs", "wrapped", "triples"])
    if shape == "text":
        return random_text(rng)
    if shape == "texts":
        return [random_text(rng) for _ in range(count)]
    width = {"pairs": 2, "wrapped": 1, "triples": 3}[shape]
    return [[random_text(rng) for _ in range(width)] for _ in range(count)]


def valid_pairs(rng: random.Random) -> list[list[str]]:
    return [[random_text(rng, READABLE), random_text(rng, READABLE)] for _ in range(rng.choice([1, 2, 16, 64]))]


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([2, 50, 999, 5_000, 20_000, 100_000])
    open_, close = rng.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"sequences":', b"}]")])
    inner = open_ * depth + b'"x"' + close * depth
    return b'{"sequences": ' + inner + b"}" if rng.random() < 0.5 else inner


def encoded(rng: random.Random, payload) -> bytes:
    """``payload`` as JSON in one of the ways a client might encode it, right or wrong."""
    text = json.dumps(payload, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
    encoding = rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"])
    # lone surrogates: written as such (invalid UTF) by the UTF codecs, as "?" by the others
    return text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")


def mutated(rng: random.Random, body: bytes) -> bytes:
    """``body`` cut short, with a random byte changed, or with random bytes inserted."""
    if not body:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 50)))
    at = rng.randrange(len(body))
    how = rng.choice(["cut", "flip", "insert"])
    if how == "cut":
        return body[:at]
    if how == "flip":
        return body[:at] + bytes([rng.getrandbits(8)]) + body[at + 1:]
    return body[:at] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20))) + body[at:]


def random_body(rng: random.Random) -> tuple[bytes, str | None]:
    """(body, content type): a fifth valid requests, a fifth nearly so, the rest anything."""
    kind = rng.choice(["valid", "valid", "plausible", "plausible", "random-sequences", "random-json", "nested",
                       "number-literal", "mutated", "extra-field", "too-large"])
    if kind == "valid":
        payload = {"sequences": valid_pairs(rng)}
        body = json.dumps(payload, ensure_ascii=rng.random() < 0.5).encode(rng.choice(["utf-8", "utf-16", "utf-32"]))
    elif kind == "plausible":
        body = encoded(rng, {"sequences": plausible_sequences(rng)})
    elif kind == "random-sequences":
        body = encoded(rng, {"sequences": random_value(rng)})
    elif kind == "random-json":
        body = encoded(rng, random_value(rng))
    elif kind == "nested":
        body = nested(rng)
    elif kind == "number-literal":
        literal = rng.choice([b"9" * 5000, b"1e99999", b"-Infinity", b"NaN", b"0x10", b"01", b"1" * 4300])
        body = b'{"sequences": ' + literal + b"}"
    elif kind == "mutated":
        body = mutated(rng, encoded(rng, {"sequences": plausible_sequences(rng)}))
    elif kind == "extra-field":
        body = encoded(rng, {"sequences": PAIR, random_text(rng)[:10] or "x": random_value(rng)})
    else:
        body = b'{"sequences": "' + b"a" * (MAX_BODY_BYTES + rng.randint(1, 1000)) + b'"}'
    content_type = "application/json" if rng.random() < 0.8 else rng.choice(CONTENT_TYPES)
    return body, content_type


def check_answer(response, labels: set[str]) -> None:
    """2xx with an answer for every text, or 4xx in the one error shape; never a 5xx."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    answer = response.json()
    if response.status_code >= 400:
        assert list(answer) == ["error"] and isinstance(answer["error"], str) and answer["error"]
        return
    assert response.status_code == 200 and set(answer) == {"labels", "scores"}
    assert len(answer["labels"]) == len(answer["scores"]) >= 1 and set(answer["labels"]) <= labels


def test_random_bodies_get_2xx_or_4xx_and_the_server_answers_right_after(served):
    model, client, _, deployment = served
    labels = set(json.loads((deployment / "config.json").read_text())["id2label"].values())
    infer = f"/v2/models/{NAME}/infer"
    before = client.post(infer, json={"sequences": PAIR}).json()
    rng = random.Random(SEED)
    statuses = {}
    for _ in range(BODIES):
        body, content_type = random_body(rng)
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.post(infer, content=body, headers=headers)
        check_answer(response, labels)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses.get(200, 0) > BODIES / 10 and statuses.get(400, 0) > BODIES / 10, statuses  # both kinds tried
    assert {413, 415, 422} <= set(statuses), statuses
    after = client.post(infer, json={"sequences": PAIR})
    assert after.status_code == 200 and after.json() == before
    assert client.get("/v2/health/ready").json() == {"status": "OK"}


# ---------------------------------------------------------------- long texts


def test_a_text_past_the_bound_is_answered_as_its_cut_as_parity_reads_it(served):
    """Words placed after a run of spaces past the character bound: the pipeline would read them
    (the spaces make no tokens), the server does not, and parity's PyTorch answer agrees with
    the server."""
    from transformers import AutoConfig

    model, _, checkpoint, deployment = served
    limit = inference.char_limit(LENGTH)
    long = "A man is" + " " * limit + " playing a loud guitar on a big stage"
    pair = [long, "A man is making music."]
    answer = model.predict(InferenceRequest(sequences=[pair]))
    assert answer == model.predict(InferenceRequest(sequences=[[long[:limit], pair[1]]]))
    uncut = model.pipeline(sequences=[pair])  # the words past the bound change the answer
    assert abs(float(uncut.scores[0]) - answer["scores"][0]) > 1e-4

    logits = inference.torch_logits(checkpoint, [{"sentence1": long, "sentence2": pair[1]}], LENGTH,
                                    tokenizer_dir=deployment)
    labels, scores = inference.answers(logits, AutoConfig.from_pretrained(deployment))
    assert labels == answer["labels"] and scores == pytest.approx(answer["scores"], abs=1e-4)


def test_a_small_request_is_answered_while_the_largest_is_in_flight(served):
    """The largest valid request (64 pairs of 4,000-character CJK texts) and, once it is being
    answered, a one-pair request: the small one finishes first, in a small part of the large
    one's time (it waits for one engine call of it, not for all 64)."""
    model, client, _, _ = served
    infer = f"/v2/models/{NAME}/infer"
    text = ("汉字测试文本中文句子" * MAX_TEXT_CHARS)[:MAX_TEXT_CHARS]
    finished = {}

    def ask(name, sequences):
        start = time.monotonic()
        response = client.post(infer, json={"sequences": sequences})
        assert response.status_code == 200, response.text[:200]
        finished[name] = (time.monotonic(), time.monotonic() - start)

    calls, answer_rows = [], model.batcher.answer_rows
    model.batcher.answer_rows = lambda rows: calls.append(rows) or answer_rows(rows)
    large = threading.Thread(target=ask, args=("large", [[text, text]] * MAX_SEQUENCES), daemon=True)
    large.start()
    deadline = time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the large request is being answered
    ask("small", PAIR)
    large.join(60)
    assert "large" in finished and finished["small"][0] < finished["large"][0]
    assert finished["small"][1] < finished["large"][1] / 4, finished
    assert 2 <= calls.index([PAIR[0]]) < len(calls) - 1  # between two of the large one's calls
    model.batcher.answer_rows = answer_rows
