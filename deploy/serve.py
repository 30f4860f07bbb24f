"""Serving stage: a deployment folder answered over HTTP on 127.0.0.1.

    python -m sparsebert.deploy.serve runs/rte/student/deployment --name rte --port 5543
    curl -s -H 'Content-Type: application/json' -d '{"sequences": [["A man eats.", "Someone eats."]]}' \\
        http://127.0.0.1:5543/v2/models/rte/infer

deepsparse.server 1.8 hands the raw JSON body to its pipeline with no request model and no
exception handlers: malformed JSON, a missing or mistyped ``sequences``, an empty list or a
text/plain body all answer HTTP 500 (measured), and an empty string gets a label. So this module
serves the same routes and request/response shapes through a thin FastAPI app that validates
first and answers 4xx ``{"error": ...}`` (see ``errors.py``). It still writes the
deepsparse.server config, and loads its own pipeline from that same file, so
``deepsparse.server --config_file <workdir>/server.yaml`` serves the identical model.

Both servers rewrite ``model.onnx`` in place with a fixed batch size, so they always load a
fresh copy of the deployment folder (``<workdir>/model``), never the original.

The deployment's ``serving.json`` (written by export) says what the model reads: single texts
sent to a sentence-pair model, or pairs sent to a single-text model, get 422 (stock
deepsparse.server labels them); and the sequence-length buckets stop at the length the ONNX was
exported and parity-checked with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import re
import shutil
import sys
import time
import unicodedata
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Union

import uvicorn
import yaml
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparsebert import offline, sparseml_mends
from sparsebert.inference import char_limit, cut_text, label_names
from sparsebert.deploy import errors
from sparsebert.deploy.batcher import Batcher
from sparsebert.deploy.engines import pipeline_engine_builder, pipeline_engine_type, served_engines
from sparsebert.deploy.errors import (DeadlineExceeded, InvalidInput, ModelNotReady, PayloadTooLarge,
                                      UnprocessableInput, UnsupportedMediaType)
from sparsebert.errors import UserError

TASK = "text_classification"
DEFAULT_NAME = "sparsebert"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5543  # deepsparse.server's default
# Short inputs run on the 64-token engine, the rest on 128; capped at the exported length.
DEFAULT_SEQUENCE_LENGTHS = (64, 128)
PIPELINE_SEQUENCE_LENGTH = 128  # DeepSparse's transformers pipelines, when a config gives none
# How long the first text of an engine call waits for others to share it (dynamic batching; only
# with --batch-size above 1): a few ms, small beside a batched call of a BERT.
DEFAULT_BATCH_WINDOW_MS = 5.0
MAX_BATCH_WINDOW_MS = 1000.0
# A request not answered this long after it arrived gets 504 (and its texts not yet sent are
# dropped): about 5x what the largest valid request took alone (5-7 s: 80% MiniLM student, one
# engine thread, 2-core AMD EPYC, batch 1), so only a backlog reaches it.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
SERVING_FILE = "serving.json"  # in the deployment folder: task, text_inputs, sequence_length
# Request limits. The pipeline truncates every text (or pair) to the longest sequence length, as
# in training and evaluation, so a longer text is accepted and truncated. No BERT reads more than
# 512 tokens, and 4,000 characters is past that for natural text (English runs 4-5 characters a
# token, Chinese one), so the limits only stop abuse; 64 texts is a generous batch.
MAX_TEXT_CHARS = 4_000
MAX_SEQUENCES = 64
# The largest valid request (64 pairs of two 4,000-character texts) must fit however its client
# encodes JSON: an encoder may \u-escape every character, 12 bytes for an astral one (an emoji is
# "\ud83d\ude00"); 64 KiB more covers quotes, brackets, separators and indentation.
ESCAPED_CHAR_BYTES = 12
MAX_BODY_BYTES = MAX_SEQUENCES * 2 * MAX_TEXT_CHARS * ESCAPED_CHAR_BYTES + (64 << 10)  # about 5.9 MiB
DRAIN_BYTES = 2 * MAX_BODY_BYTES  # past this, close without reading (see read_body)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a single URL path segment


class DeploymentError(UserError):
    pass


@dataclass
class ServeSettings:
    name: str = DEFAULT_NAME
    engine: str = "deepsparse"
    batch_size: int = 1
    # None: DEFAULT_SEQUENCE_LENGTHS up to the deployment's exported length (see prepare)
    sequence_lengths: Optional[tuple[int, ...]] = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Cores the engine runs on (DeepSparse cores, ONNX Runtime intra-op threads); None: all.
    threads: Optional[int] = None
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise DeploymentError(f"model name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.engine not in served_engines():
            raise DeploymentError(f"unknown engine {self.engine!r}; choose one of {served_engines()}")
        if self.batch_size < 1:
            raise DeploymentError(f"batch size must be at least 1, not {self.batch_size}")
        if self.sequence_lengths is not None:
            self.sequence_lengths = tuple(sorted(set(self.sequence_lengths)))
            if not self.sequence_lengths or self.sequence_lengths[0] < 8:
                raise DeploymentError(f"sequence lengths must be at least 8 tokens: {self.sequence_lengths}")
        if self.threads is not None and self.threads < 1:
            raise DeploymentError(f"threads must be at least 1, not {self.threads}")
        if not 0 < self.port < 65536:
            raise DeploymentError(f"port {self.port} is not a TCP port")
        check_batch_window(self.batch_window_ms)
        check_request_timeout(self.request_timeout_s)


def check_request_timeout(timeout_s: float) -> None:
    if not 0 < timeout_s <= 3600:
        raise DeploymentError(f"the request timeout must be above 0 and at most 3600 s, not {timeout_s:g}")


def check_batch_window(window_ms: float) -> None:
    if not 0 <= window_ms <= MAX_BATCH_WINDOW_MS:
        raise DeploymentError(f"the batch window must be 0 to {MAX_BATCH_WINDOW_MS:g} ms, not {window_ms:g}")


# ---------------------------------------------------------------- deployment copy and config


def check_deployment(folder: Path) -> dict:
    """The folder's ``config.json``, after checking the folder can be served."""
    missing = [name for name in ("model.onnx", "config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        missing.append("tokenizer.json")
    if missing:
        raise DeploymentError(f"{folder} is not a deployment folder: missing {', '.join(missing)}")
    config = json.loads((folder / "config.json").read_text())
    # Answers are label names (DeepSparse's pipeline also breaks on id2label={0: 0, 1: 1}).
    label_names(config.get("id2label"), f"{folder}/config.json")
    return config


def read_serving_info(folder: Path) -> dict:
    """The folder's ``serving.json`` (what export measured), or {} for a folder without one."""
    path = Path(folder) / SERVING_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeploymentError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(info, dict) or info.get("text_inputs") not in (None, 1, 2):
        raise DeploymentError(f"{path} must be an object whose text_inputs is 1, 2 or null")
    length = info.get("sequence_length")
    if length is not None and (not isinstance(length, int) or length < 8):
        raise DeploymentError(f"{path} has sequence_length {length!r}; it must be at least 8 tokens")
    return info


def default_sequence_lengths(exported_length: Optional[int]) -> tuple[int, ...]:
    """The default buckets up to and including the length the ONNX was exported and
    parity-checked with, so texts are truncated where parity was measured (256 -> 64, 128, 256)."""
    if exported_length is None:
        return DEFAULT_SEQUENCE_LENGTHS
    return tuple(n for n in DEFAULT_SEQUENCE_LENGTHS if n < exported_length) + (exported_length,)


def copy_deployment(deployment: Path, workdir: Path) -> Path:
    """A fresh copy of ``deployment`` at ``workdir/model`` (the servers rewrite ``model.onnx``)."""
    target = (workdir / "model").resolve()
    source = deployment.resolve()
    if target == source or target in source.parents:
        raise DeploymentError(f"--workdir {workdir} would overwrite the deployment folder itself")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def server_config(model_copy: Path, settings: ServeSettings) -> dict:
    """A deepsparse.server config with one endpoint, routed at ``/v2/models/<name>/infer``."""
    endpoint = {
        "name": settings.name,
        "route": f"/{settings.name}",
        "task": TASK,
        "model": str(model_copy),
        "batch_size": settings.batch_size,
        "bucketing": {"sequence_lengths": list(settings.sequence_lengths or DEFAULT_SEQUENCE_LENGTHS)},
        # deepsparse.server has no engine field: EndpointConfig passes `kwargs` to the Pipeline.
        "kwargs": {"engine_type": pipeline_engine_type(settings.engine)},
        # Per-request latency lines on stdout otherwise; nothing here leaves the machine.
        "logging_config": {"enable": False},
    }
    config = {"system_logging": {"enable": False}, "endpoints": [endpoint]}
    if settings.threads:
        config["num_cores"] = settings.threads  # deepsparse.server hands it to every pipeline
    return config


def write_server_config(workdir: Path, model_copy: Path, settings: ServeSettings) -> Path:
    path = workdir / "server.yaml"
    command = f"deepsparse.server --config_file {path} --host {settings.host} --port {settings.port}"
    stock = (f"# Stock server (HTTP 500 on bad input):\n#   {command}\n"
             if pipeline_engine_builder(pipeline_engine_type(settings.engine)) is None else
             f"# The stock deepsparse.server cannot run {settings.engine} (the project's own engine).\n")
    header = (f"# deepsparse.server config for {settings.name} ({settings.engine}), written by "
              f"sparsebert.deploy.serve.\n{stock}"
              f"# Validating server (HTTP 4xx on bad input), same routes:\n"
              f"#   python -m sparsebert.deploy.serve --config {path} --port {settings.port}\n")
    path.write_text(header + yaml.safe_dump(server_config(model_copy, settings), sort_keys=False))
    return path


def prepare(deployment: Path, workdir: Path, settings: ServeSettings) -> Path:
    """Copy the deployment into ``workdir`` and write ``workdir/server.yaml``; return its path.
    Without explicit sequence lengths, the buckets come from the deployment's serving.json."""
    config = check_deployment(Path(deployment))
    serving = read_serving_info(Path(deployment))
    if settings.sequence_lengths is None:
        settings = replace(settings, sequence_lengths=default_sequence_lengths(serving.get("sequence_length")))
    longest = max(settings.sequence_lengths)
    if longest > config.get("max_position_embeddings", longest):
        raise DeploymentError(f"sequence length {longest} exceeds the model's "
                              f"max_position_embeddings {config['max_position_embeddings']}")
    workdir.mkdir(parents=True, exist_ok=True)
    return write_server_config(workdir, copy_deployment(Path(deployment), workdir), settings)


def default_workdir(deployment: Path, name: str) -> Path:
    return Path(deployment).resolve().parent / "serving" / name


# ---------------------------------------------------------------- requests


class InferenceRequest(BaseModel):
    """The body deepsparse.server's text_classification endpoint takes, validated."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"sequences": "A man is playing a guitar."},
        {"sequences": [["A man is playing a guitar.", "Someone plays music."]]},
    ]})
    sequences: Union[str, List[str], List[List[str]]] = Field(
        description="one text, a list of texts, or a list of [sentence1, sentence2] pairs (a "
                    "sentence-pair model such as MRPC reads only pairs, a single-text model such "
                    f"as SST-2 only texts: 422 otherwise); at most {MAX_SEQUENCES} items of at "
                    f"most {MAX_TEXT_CHARS:,} characters each")

    @field_validator("sequences", mode="before")
    @classmethod
    def _check(cls, value):
        check_sequences(value)
        return value


class InferenceResponse(BaseModel):
    labels: List[str] = Field(description="the predicted label of each input, from config.json's "
                                          "id2label (a regression task's one label: STS-B's \"similarity\")")
    scores: List[float] = Field(description="classification: the probability of the predicted label; "
                                            "regression: the predicted value on the task's own scale "
                                            "(STS-B: 0 to 5)")


class ErrorBody(BaseModel):
    error: str


def json_type(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object",
             list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# Unicode categories with nothing to read: controls, format (zero-width, BOM), surrogates, private
# use, unassigned, separators, and combining marks with no letter to sit on.
_NOTHING_TO_READ = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"}
_REPLACEMENT_CHARACTER = "\ufffd"


def is_blank(text: str) -> bool:
    """Nothing but whitespace and characters with nothing to read (U+200B, ZWJ/ZWNJ, BOM, a lone
    accent, U+FFFD...), which BERT's tokenizer drops or cannot read: the model would label an
    empty input."""
    return all(char == _REPLACEMENT_CHARACTER or unicodedata.category(char) in _NOTHING_TO_READ
               for char in text)


def check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a string, not {json_type(text)}")
    if is_blank(text):
        raise ValueError(f"{where} is empty; send some text to classify")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{where} has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,} "
                         "(the model reads only the first sequence-length tokens of a text)")


def check_sequences(value) -> None:
    """Raise ValueError, with a message for the client, unless ``value`` is a text, a list of
    texts, or a list of [text] / [text, text_pair] lists of one size."""
    if isinstance(value, str):
        return check_text(value, "sequences")
    if not isinstance(value, list):
        raise ValueError("sequences must be a string, a list of strings or a list of "
                         f"[sentence1, sentence2] pairs, not {json_type(value)}")
    if not value:
        raise ValueError("sequences is an empty list; send at least one text")
    if len(value) > MAX_SEQUENCES:
        raise ValueError(f"sequences has {len(value)} items; the limit is {MAX_SEQUENCES} per request")
    if all(isinstance(item, str) for item in value):
        for i, text in enumerate(value):
            check_text(text, f"sequences[{i}]")
    elif all(isinstance(item, list) for item in value):
        if len({len(item) for item in value}) != 1 or len(value[0]) not in (1, 2):
            raise ValueError("each item of sequences must be [sentence1, sentence2] "
                             "(or [sentence]), all of the same size")
        for i, item in enumerate(value):
            for j, text in enumerate(item):
                check_text(text, f"sequences[{i}][{j}]")
    else:
        kinds = sorted({json_type(item) for item in value})
        raise ValueError("the items of sequences must be all strings or all [sentence1, sentence2] "
                         f"pairs, not {' and '.join(kinds)}")


def parse_request(payload) -> InferenceRequest:
    if not isinstance(payload, dict):
        raise InvalidInput('the body must be a JSON object like {"sequences": "some text"}, '
                           f"not {json_type(payload)}")
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as error:
        raise InvalidInput(errors.describe(error.errors(include_url=False))) from None


def require_json(content_type: Optional[str]) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(f"Content-Type must be application/json, not {content_type or 'missing'}")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, or PayloadTooLarge past ``limit``. Up to DRAIN_BYTES, an oversized body is read
    and dropped, never stored: clients such as urllib send the whole body before reading any
    answer, and would get a broken pipe instead of the 413 if it were left unread."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise PayloadTooLarge(f"the body has {int(declared):,} bytes; the limit is {limit:,}")
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= limit:
            body += chunk
        elif received > DRAIN_BYTES:
            break
    if received > limit:
        raise PayloadTooLarge(f"the body is larger than the limit of {limit:,} bytes")
    return bytes(body)


async def read_json(request: Request):
    require_json(request.headers.get("content-type"))
    body = await read_body(request)
    try:
        return json.loads(body)
    except ValueError as error:  # bad JSON or encoding, and integers past Python's 4,300 digits
        raise InvalidInput(f"malformed JSON body: {error}") from None
    except RecursionError:  # arrays or objects thousands deep: Python's parser gives up, not the server
        raise InvalidInput("malformed JSON body: nested too deeply") from None


# ---------------------------------------------------------------- model and app


def load_pipeline(config_path: Path):
    """The DeepSparse pipeline of the single endpoint in a deepsparse.server config, built the
    way deepsparse.server builds it, so both servers answer alike."""
    from deepsparse import Pipeline
    from deepsparse.server.config import ServerConfig

    config = ServerConfig(**yaml.safe_load(Path(config_path).read_text()))
    if len(config.endpoints) != 1:
        raise DeploymentError(f"{config_path} must have exactly one endpoint")
    pipeline_config = config.endpoints[0].to_pipeline_config()
    pipeline_config.num_cores = config.num_cores  # what deepsparse.server sets from its context
    build = pipeline_engine_builder(pipeline_config.engine_type)
    if build is None:
        return Pipeline.from_config(pipeline_config)
    # An engine of the project's own: DeepSparse builds the pipeline (tokenizer, buckets, labels)
    # without an engine, and each bucket gets ours.
    pipeline_config.kwargs = {**(pipeline_config.kwargs or {}), "_delay_engine_initialize": True}
    pipeline = Pipeline.from_config(pipeline_config)
    built = {}  # the buckets share one file (our engine takes any length): one engine for all
    for bucket in getattr(pipeline, "_pipelines", None) or [pipeline]:
        path = Path(bucket.onnx_file_path)
        bucket.engine = built[path] = built.get(path) or build(path, config.num_cores)
    return pipeline


def truncation_length(endpoint: dict) -> int:
    """The length an endpoint's pipeline truncates at, as deepsparse.server builds it: the
    kwargs' ``sequence_length`` over the bucketing's (the longest bucket), else DeepSparse's 128."""
    lengths = ((endpoint.get("kwargs") or {}).get("sequence_length")
               or (endpoint.get("bucketing") or {}).get("sequence_lengths") or PIPELINE_SEQUENCE_LENGTH)
    return max(lengths) if isinstance(lengths, (list, tuple)) else int(lengths)


def unwrap_single_texts(sequences):
    """``[["a"], ["b"]]`` as ``["a", "b"]``: DeepSparse's pipeline unwraps these itself, but its
    sequence-length bucket router tokenizes them first and fails (TypeError)."""
    if isinstance(sequences, list) and all(isinstance(item, list) and len(item) == 1 for item in sequences):
        return [item[0] for item in sequences]
    return sequences


def text_inputs(sequences) -> int:
    """2 for [[sentence1, sentence2], ...]; 1 for a text, a list of texts or [[text], ...]."""
    if isinstance(sequences, list) and isinstance(sequences[0], list):
        return len(sequences[0])  # validated: every item has the same size
    return 1


class ServedModel:
    """One pipeline, loaded from a server config, called from one thread only: Hugging Face fast
    tokenizers fail when called from several threads at once ("Already borrowed"), and one engine
    call already spreads over all cores. That thread batches (``batcher.py``): the texts of
    concurrent requests share engine calls of up to the config's ``batch_size`` rows, the batch
    size compiled into the engine, and a large request's rows are split across calls that take
    turns with other requests, so a small request waits for one call, not for all of it.

    Each call goes to the sequence-length bucket of its longest text, as DeepSparse routes any
    call: the engine pads every call to its compiled batch size, so a short text costs nothing
    more in a longer call's empty slots than in a call of its own, while a call of its own costs
    a whole batch. Padding is masked, so a text's answer is the same in either, to float error."""

    def __init__(self, config_path: Path, batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        check_batch_window(batch_window_ms)
        check_request_timeout(request_timeout_s)
        self.config_path = Path(config_path)
        endpoint = yaml.safe_load(self.config_path.read_text())["endpoints"][0]
        self.name, self.model_path = endpoint["name"], endpoint["model"]
        # Texts are cut for the length the pipeline truncates at before it tokenizes them, as
        # parity cuts them (inference.cut_text).
        self.sequence_length = truncation_length(endpoint)
        self.request_timeout_s = request_timeout_s
        self.draining = False  # set on a shutdown signal: new requests get 503
        serving = read_serving_info(Path(self.model_path))
        self.task = serving.get("task") or self.name
        self.text_inputs = serving.get("text_inputs")  # None: unknown, both kinds accepted
        self.pipeline = None
        self.batch_size = int(endpoint.get("batch_size") or 1)
        self.batch_window_ms = batch_window_ms
        self.batcher: Optional[Batcher] = None

    def check_text_inputs(self, request: InferenceRequest) -> None:
        """UnprocessableInput for single texts sent to a pair model or pairs to a single-text
        one: the model would answer them, with a label that means nothing."""
        if self.text_inputs is None or text_inputs(request.sequences) == self.text_inputs:
            return
        if self.text_inputs == 2:
            raise UnprocessableInput(f"this model ({self.task}) reads sentence pairs: "
                                     "send [[sentence1, sentence2], ...]")
        raise UnprocessableInput(f"this model ({self.task}) reads single texts: "
                                 'send "text" or ["text", ...]')

    def load(self) -> None:
        """Load the pipeline and answer one warm-up request with it before calling the model
        ready: the engine's first call (buffers, kernels) is paid here, not by a user, and a
        model that cannot answer never reads as ready. A second load replaces the first: its
        batcher thread and pipeline are released first (two models may not fit in memory)."""
        self.close()
        pipeline = load_pipeline(self.config_path)
        warm_up = [["A warm-up sentence.", "Another one."]] if self.text_inputs == 2 else ["A warm-up sentence."]
        # With sequence-length buckets DeepSparse holds one pipeline per length and routes a short
        # text to the shortest: each is called, as each pads the text to its own length.
        for bucket in getattr(pipeline, "_pipelines", None) or [pipeline]:
            bucket(sequences=warm_up)
        # Bound to this pipeline, not to self.pipeline: close() may release that during a call.
        answer = functools.partial(answer_rows, pipeline)
        self.batcher = Batcher(answer, self.batch_size, self.batch_window_ms / 1000)
        self.pipeline = pipeline

    def drain(self) -> None:
        """Refuse new requests (503) and read as not ready; those already submitted are answered."""
        self.draining = True

    def close(self) -> None:
        """Stop the batcher thread (requests still waiting get ModelNotReady) and release the
        pipeline. Safe to call twice, or before load()."""
        batcher, self.batcher, self.pipeline = self.batcher, None, None
        if batcher is not None:
            batcher.close()

    def require_ready(self) -> Batcher:
        """The batcher, or ModelNotReady when nothing would answer: not loaded, closed, or
        its thread died (a readiness probe must not say OK to requests that would hang)."""
        batcher = self.batcher
        if self.draining:
            raise ModelNotReady(f"model '{self.name}' is shutting down")
        if batcher is None:
            raise ModelNotReady(f"model '{self.name}' is not loaded yet")
        if not batcher.running():
            raise ModelNotReady(f"model '{self.name}' cannot answer: {batcher.why_stopped()}")
        return batcher

    def deadline(self) -> float:
        """When a request arriving now must be answered by (``time.monotonic()``)."""
        return time.monotonic() + self.request_timeout_s

    def cut(self, row):
        """A text, or each text of a pair, cut to what the model can read (inference.cut_text);
        InvalidInput if a text is blank once cut (the model would label an empty input)."""
        texts = [cut_text(text, self.sequence_length) for text in ([row] if isinstance(row, str) else row)]
        if any(is_blank(text) for text in texts):
            raise InvalidInput(f"a text has nothing to read in its first {char_limit(self.sequence_length):,} "
                               "characters, all that this model reads")
        return texts[0] if isinstance(row, str) else texts

    def submit(self, request: InferenceRequest, deadline: Optional[float] = None) -> Future:
        """A future of the (label, score) of each of the request's texts, in order; after
        ``deadline`` its texts not yet sent are dropped and it fails with DeadlineExceeded."""
        batcher = self.require_ready()
        sequences = unwrap_single_texts(request.sequences)
        rows = [self.cut(row) for row in (sequences if isinstance(sequences, list) else [sequences])]
        # Single texts and pairs (both accepted when serving.json does not say) never share a
        # call: the tokenizer reads a list of one kind.
        return batcher.submit(rows, group=text_inputs(rows), deadline=deadline)

    def predict(self, request: InferenceRequest) -> dict:
        return as_response(self.submit(request, self.deadline()).result())


def answer_rows(pipeline, rows: list) -> list[tuple[str, float]]:
    """(label, score) of each row, from one pipeline call (on the batcher thread)."""
    output = pipeline(sequences=rows)
    return [(str(label), float(score)) for label, score in zip(output.labels, output.scores)]


def as_response(answers: list[tuple[str, float]]) -> dict:
    """``InferenceResponse``'s fields from (label, score) pairs."""
    return {"labels": [label for label, _ in answers], "scores": [score for _, score in answers]}


def create_app(model: ServedModel) -> FastAPI:
    """deepsparse.server's routes for one model: infer, model ready/metadata, server health.
    The app closes the model when it shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(model.close)  # waits for an engine call in progress

    app = FastAPI(title=f"SparseBERT: {model.name}", lifespan=lifespan,
                  description="deepsparse.server's text_classification API, with 4xx on bad input")
    errors.install(app, served=[model.name])
    prefix = f"/v2/models/{model.name}"
    error_responses = {status: {"model": ErrorBody} for status in (400, 404, 413, 415, 422, 503, 504)}

    @app.get("/v2/health/live", tags=["health"])
    def live():
        return {"status": "OK"}

    @app.get("/v2/health/ready", tags=["health"])
    @app.get(f"{prefix}/ready", tags=["health"])
    def ready():
        model.require_ready()
        return {"status": "OK"}

    @app.get(prefix, tags=["model"])
    def metadata():
        return {"model_path": model.model_path}

    request_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": InferenceRequest.model_json_schema()}}}}

    @app.post(f"{prefix}/infer", tags=["model"], response_model=InferenceResponse,
              responses=error_responses, openapi_extra=request_body)
    async def infer(request: Request):
        deadline = model.deadline()
        parsed = parse_request(await read_json(request))
        model.check_text_inputs(parsed)
        model.require_ready()
        answers = asyncio.wrap_future(model.submit(parsed, deadline))  # no thread held while it waits
        try:  # answered at the deadline even while an engine call of others holds the batcher
            return as_response(await asyncio.wait_for(answers, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(f"model '{model.name}' did not answer within {model.request_timeout_s:g} s "
                                   "(the server is busy: retry later, or send fewer texts)") from None

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown on SIGINT/SIGTERM (stop listening, let in-flight requests
    finish, bounded by their deadline, then the app's lifespan closes the model), plus one thing
    uvicorn lacks: the app hears of the shutdown only once every connection is done, so the
    model is told at the signal, to answer any request still reaching it 503."""

    def __init__(self, config: uvicorn.Config, model: ServedModel):
        super().__init__(config)
        self.model = model

    def handle_exit(self, sig, frame) -> None:
        self.model.drain()
        super().handle_exit(sig, frame)


def start_server(model: ServedModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``model`` with uvicorn until interrupted (one process: the model is loaded once)."""
    config = uvicorn.Config(create_app(model), host=host, port=port, log_level="info", workers=1)
    DrainingServer(config, model).run()


def serve(deployment: Optional[Path], settings: ServeSettings, workdir: Optional[Path] = None,
          config_path: Optional[Path] = None, config_only: bool = False) -> Path:
    """Copy ``deployment``, write its server config, load the model, then serve until stopped
    (or stop after writing the config when ``config_only``). Return the config's path."""
    if config_path is None:
        workdir = Path(workdir or default_workdir(deployment, settings.name))
        config_path = prepare(Path(deployment), workdir, settings)
    if config_only:
        return config_path
    model = ServedModel(config_path, settings.batch_window_ms, settings.request_timeout_s)
    model.load()  # before listening: a server that is up always has a model
    print(f"serving {model.name} on http://{settings.host}:{settings.port}/v2/models/{model.name}/infer "
          f"(config {config_path})", flush=True)
    start_server(model, settings.host, settings.port)
    return config_path


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsebert.deploy.serve",
                                description="Serve a deployment folder (validating FastAPI app).")
    p.add_argument("deployment", type=Path, nargs="?",
                   help="folder with model.onnx, config.json and the tokenizer")
    p.add_argument("--config", type=Path,
                   help="serve an existing server.yaml (its name, engine, batch size and buckets) "
                        "instead of copying a deployment folder")
    p.add_argument("--name", default=DEFAULT_NAME, help="model name in /v2/models/<name>/infer")
    p.add_argument("--engine", choices=served_engines(), default="deepsparse")
    p.add_argument("--batch-size", type=int, default=1,
                   help="the engine's compiled batch size, and the most texts one engine call answers: "
                        "above 1, concurrent requests' texts share calls (dynamic batching)")
    p.add_argument("--batch-window-ms", type=float, default=DEFAULT_BATCH_WINDOW_MS,
                   help="how long a text waits for others to share its engine call (with --batch-size "
                        f"above 1; default {DEFAULT_BATCH_WINDOW_MS:g})")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="SECONDS",
                   help="answer 504 to a request not answered within this (default "
                        f"{DEFAULT_REQUEST_TIMEOUT_S:g}); its texts not yet sent are dropped")
    p.add_argument("--sequence-lengths", type=int, nargs="+",
                   help="token buckets; the longest one is where texts get truncated (default "
                        "64 and 128, up to the length in the deployment's serving.json)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--threads", type=int, help="cores the engine runs on (default: all); on small VMs "
                                               "1 avoids spin-wait stalls")
    p.add_argument("--workdir", type=Path,
                   help="where the model copy and server.yaml go (default <deployment>/../serving/<name>)")
    p.add_argument("--config-only", action="store_true",
                   help="write the copy and server.yaml for deepsparse.server, then exit")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    offline.configure()
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.deployment is None) == (args.config is None):
        parser.error("give either a deployment folder or --config")
    try:
        sparseml_mends.apply()
        lengths = tuple(args.sequence_lengths) if args.sequence_lengths else None
        settings = ServeSettings(args.name, args.engine, args.batch_size, lengths, args.host, args.port, args.threads,
                                 args.batch_window_ms, args.request_timeout)
        config_path = serve(args.deployment, settings, args.workdir, args.config, args.config_only)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.config_only:
        print(config_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
