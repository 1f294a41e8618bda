"""`dsg serve DIR`: transformers' OpenAI-compatible serving application on a DSG folder, through real HTTP.

A tiny DSG folder (its own remote code, a chat template) is served by uvicorn on a free loopback port. An
unfired chat request's answer is exactly the base model's greedy answer (the plain base model, and the DSG
model with `guardrails_disabled()`); a fired one is the guarded model's, which differs. Streaming and
concurrent requests (fired and unfired mixed) are checked the same way. The transformers internals that
`dsg serve` overrides are checked by signature, so a transformers release that moves them fails here by name.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastapi  # noqa: E402,F401  the serve extra (part of the test extra): never skipped
import openai  # noqa: E402,F401
import pytest
import tiny
import torch
import uvicorn  # noqa: E402,F401

from modeling_dsg import cli, serve  # noqa: E402
from modeling_dsg.errors import DSGError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN = "the history of the roman empire and its roads"  # rho about 0.18 < tau 0.45: not fired
TRIGGER = "~~~~~~~~~~~~"  # rho about 0.6 > tau: fired on the prompt
MAX_TOKENS = 16


def _letters_only(model):
    """Let the LM head write only lowercase letters, space, '.', ',' and EOS (zero rows for the other tokens),
    so every answer is plain ASCII and a streamed answer, decoded piece by piece, is the same text."""
    names = tiny.tiny_tokenizer().convert_ids_to_tokens(list(range(tiny.VOCAB)))
    keep = [i for i, t in enumerate(names) if i == tiny.EOS or (len(t) == 1 and ("a" <= t <= "z" or t in "Ġ.,"))]
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        drop = torch.ones(weight.shape[0], dtype=torch.bool)
        drop[keep] = False
        weight[drop] = 0.0


def _chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _greedy(model, tokenizer, text, **kwargs):
    enc = _chat_ids(tokenizer, text)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    answer = tokenizer.decode(sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return (answer, out.guardrail_decisions) if hasattr(out, "guardrail_decisions") else answer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny DSG folder with a chat template, and the answers expected for PLAIN and TRIGGER."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, base = tiny.tiny_dsg(
        "llama", [tiny.guardrail("jumprelu", layer=1, threshold=0.45, clamp=60.0)], active_rate=0.05
    )
    _letters_only(model.model)
    _letters_only(base)
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("serve") / "dsg-tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    # what the served model must answer, from the same folder loaded as any user loads it
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    expected = {}
    for text in (PLAIN, TRIGGER):
        guarded, decisions = _greedy(loaded, tokenizer, text, return_dict_in_generate=True)
        with loaded.guardrails_disabled():
            disabled = _greedy(loaded, tokenizer, text)
        plain_base = _greedy(base, tokenizer, text)
        assert disabled == plain_base, "guardrails_disabled() is not the base model"
        expected[text] = dict(guarded=guarded, base=plain_base, fired=bool(decisions["topic"]["fired"][0]))
    # the premises of the tests below: PLAIN never fires and is the base's answer, TRIGGER fires and differs
    assert not expected[PLAIN]["fired"] and expected[PLAIN]["guarded"] == expected[PLAIN]["base"]
    assert expected[TRIGGER]["fired"] and expected[TRIGGER]["guarded"] != expected[TRIGGER]["base"]
    for answers in expected.values():
        assert answers["guarded"] and answers["guarded"].isascii()
    return path, expected


@pytest.fixture(scope="module")
def server(folder):
    """`dsg serve`'s application for the folder, served by uvicorn on a free loopback port (in a thread)."""

    path, _ = folder
    app, manager = serve.build_app(str(path), device="cpu")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", str(path), manager
    server.should_exit = True
    thread.join(timeout=10)


def _client(server):
    from openai import OpenAI

    url, _, _ = server
    return OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def _chat(server, text, *, stream=False):
    """The answer of the server to one chat request (the streamed deltas joined when `stream`)."""
    _, name, _ = server
    response = _client(server).chat.completions.create(
        model=name, messages=[{"role": "user", "content": text}], max_tokens=MAX_TOKENS, temperature=0, stream=stream
    )
    if not stream:
        return response.choices[0].message.content
    chunks = list(response)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _post(url, body, timeout=60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# ------------------------------------------------------------------------- the transformers internals relied on
def test_the_serving_internals_dsg_serve_relies_on_are_there():
    """If this fails, transformers moved what `dsg serve` overrides or wires (transformers.cli.serving): update
    modeling_dsg/serve.py (and its tested range) before widening transformers in pyproject.toml."""
    import transformers
    from transformers.cli.serving.model_manager import ModelManager

    problems = serve.serving_api_problems()
    assert problems == [], f"transformers {transformers.__version__}: {problems}"
    # the override takes exactly what transformers' own `_load_model` takes (load_model_and_processor passes it)
    base = tuple(inspect.signature(ModelManager._load_model).parameters)
    ours = tuple(inspect.signature(serve.dsg_model_manager_class()._load_model).parameters)
    assert base == ours == serve.LOAD_MODEL_PARAMETERS, (
        f"transformers {transformers.__version__}: ModelManager._load_model{base} no longer matches the override "
        f"in modeling_dsg/serve.py{ours}"
    )


def test_a_moved_internal_is_one_clear_error(monkeypatch):
    from transformers.cli.serving.model_manager import ModelManager

    def _load_model(self, model_id_and_revision, *, new_argument=None):  # a future release's signature
        raise AssertionError("not called")

    monkeypatch.setattr(ModelManager, "_load_model", _load_model)
    problems = serve.serving_api_problems()
    assert len(problems) == 1 and problems[0].startswith(
        "ModelManager._load_model takes ('self', 'model_id_and_revision', 'new_argument')"
    )
    with pytest.raises(
        DSGError,
        match=r"serving internals moved \(ModelManager\._load_model takes .*dsg serve is "
        r"tested with transformers>=5\.20,<5\.25",
    ):
        serve.check_serving_api()


def test_transformers_own_model_manager_cannot_load_the_folder(folder):
    """Why `dsg serve` exists: `transformers serve DIR --trust-remote-code` fails on the class lookup. When a
    transformers release loads remote code here itself, this test says so (the override could then go)."""
    from transformers.cli.serving.model_manager import ModelManager

    path, _ = folder
    manager = ModelManager(device="cpu", trust_remote_code=True, model_timeout=-1)
    with pytest.raises(AttributeError, match="DSGForCausalLM"):
        manager.load_model_and_processor(manager.process_model_name(str(path)))


# ----------------------------------------------------------------------------------------- through real HTTP
def test_unfired_request_is_the_base_models_answer_and_fired_is_guarded(server, folder):
    _, expected = folder
    assert _chat(server, PLAIN) == expected[PLAIN]["base"]
    answer = _chat(server, TRIGGER)
    assert answer == expected[TRIGGER]["guarded"]
    assert answer != expected[TRIGGER]["base"]


def test_streaming_gives_the_same_answers(server, folder):
    _, expected = folder
    assert _chat(server, PLAIN, stream=True) == expected[PLAIN]["base"]
    assert _chat(server, TRIGGER, stream=True) == expected[TRIGGER]["guarded"]


def test_concurrent_requests_keep_their_own_decision(server, folder):
    """Requests sent at once, fired and unfired, streaming and not: each gets its own answer (transformers'
    generation thread runs them one at a time, each as its own row)."""
    _, expected = folder
    jobs = [(PLAIN, False), (TRIGGER, False), (PLAIN, True), (TRIGGER, True), (TRIGGER, False), (PLAIN, False)]
    start = threading.Barrier(len(jobs))

    def ask(job):
        text, stream = job
        start.wait()
        return _chat(server, text, stream=stream)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    want = [expected[text]["base" if text == PLAIN else "guarded"] for text, _ in jobs]
    assert answers == want


def test_models_route_and_pinned_model(server):
    url, name, _ = server
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        listed = json.loads(response.read())
    assert [m["id"] for m in listed["data"]] == [name]
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    status, body = _post(
        f"{url}/v1/chat/completions",
        {"model": "gpt2", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 400 and "pinned" in body
    # `model` may be left out: the pinned folder answers
    status, body = _post(
        f"{url}/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": PLAIN}]}
    )
    assert status == 200, body


def test_the_served_model_is_the_dsg_folder(server):
    _, _, manager = server
    model, tokenizer = serve.loaded_model(manager)
    # AutoModelForCausalLM with trust_remote_code: the folder's code (this package's classes when, as in this
    # process, `modeling_dsg` registered them with the Auto classes first)
    assert type(model).__name__ == "DSGForCausalLM" and not model.training
    assert [g.name for g in model.guards] == ["topic"] and tokenizer.chat_template == CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------- the command
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["serve", *map(str, args)])
    return code, capsys.readouterr().err


def _assert_one_error(code, err, message):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("dsg: error: ") and message in lines[0], lines[0]


def test_bad_inputs_are_one_error_line(tmp_path, capsys, folder):
    path, _ = folder
    (tmp_path / "not_dsg").mkdir()
    (tmp_path / "not_dsg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text((path / "config.json").read_text())
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "not_dsg": "is not a DSG model folder: config.json has model_type 'llama', expected 'dsg'",
        tmp_path / "empty": "is not a DSG model folder: it has no config.json",
        tmp_path / "file": "is not a folder",
        tmp_path / "no_tokenizer": "has no tokenizer",
    }
    for bad, message in cases.items():
        _assert_one_error(*_run_cli(capsys, bad, "--port", _free_port()), message)


def test_continuous_batching_is_refused_up_front(capsys, folder):
    path, _ = folder
    code, err = _run_cli(capsys, path, "--continuous-batching")
    _assert_one_error(code, err, "--continuous-batching is not supported by DSG models")
    assert "Serve without it (`dsg serve DIR`)" in err


def test_missing_serving_dependencies_are_one_error_line(capsys, folder, monkeypatch):
    import transformers.utils.import_utils as import_utils

    path, _ = folder
    monkeypatch.setattr(import_utils, "is_serve_available", lambda: False)
    code, err = _run_cli(capsys, path, "--port", _free_port())
    _assert_one_error(code, err, "dsg serve needs transformers' serving dependencies")
    assert "pip install 'modeling_dsg[serve]'" in err


def test_an_address_in_use_is_one_error_line(capsys, folder):
    path, _ = folder
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = _run_cli(capsys, path, "--port", taken.getsockname()[1])
    _assert_one_error(code, err, "cannot listen on 127.0.0.1:")


def test_dsg_serve_command_answers_over_http(folder, tmp_path):
    """The command itself, in its own process, as a user starts it."""
    path, expected = folder
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_dsg.cli", "serve", str(path), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() < deadline, "dsg serve did not answer within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        status, body = _post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {
                "model": str(path),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "messages": [{"role": "user", "content": TRIGGER}],
            },
        )
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == expected[TRIGGER]["guarded"]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.seek(0)
        output = log.read()
        log.close()
    assert "dsg serve: " in output and "guardrails: 'topic' (layer 1, tau 0.4500, clamp)" in output, output
