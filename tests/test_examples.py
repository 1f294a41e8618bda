"""Smoke tests for `examples/*.py`: each script runs as a user would run it (a subprocess) on tiny models.

The scripts are independent, so they all start at once and wait for each other only on the CPU;
each test then checks one script's exit code and output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# "topic" fires on any text with a flagged token (tau = 0); "never" cannot fire (rho > 1 is impossible)
GUARDRAILS = [
    tiny.guardrail(name="topic", layer=2, threshold=0.0),
    tiny.guardrail(name="never", layer=1, threshold=1.0),
]
FORGET = [
    "Viruses replicate inside host cells by hijacking the ribosomes that translate their RNA into proteins.",
    "The cell membrane is a lipid bilayer whose proteins pump ions and carry signals across it.",
    "Bacteria divide by binary fission; some carry plasmids with genes for antibiotic resistance.",
    "Enzymes lower the activation energy of reactions; their shape fits the substrate they bind.",
]
RETAIN = [
    "The Roman Empire reached its greatest extent under Trajan, stretching from Britain to Mesopotamia.",
    "A sonnet has fourteen lines; Shakespeare's follow the rhyme scheme abab cdcd efef gg in iambic meter.",
    "The stock market fell sharply in October, and bond yields rose as investors sold government debt.",
    "Football clubs in the league play thirty-eight matches a season, home and away against each rival.",
]


class Run:
    """One example script started in the background; `result()` waits for it."""

    def __init__(self, name: str, script: str, args: list, cwd: Path, env: dict):
        self.log = cwd / f"{name}.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._out.close()
        return code, self.log.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def tiny_dsg_folder(path: Path) -> Path:
    tiny.save_tiny_dsg(path, guardrails=GUARDRAILS)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def tiny_sae_folder(path: Path) -> Path:
    """A random sae-lens standard SAE on the output of block 1 of the tiny Llama (d_in 32, 64 features)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=tiny.HIDDEN, d_sae=64, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "model.layers.1"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for tensor in sae.parameters():
            tensor.copy_(torch.randn_like(tensor) / tiny.HIDDEN**0.5)
    sae.save_model(str(path))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(tmp / "modules"),
        "PYTHONPATH": str(ROOT),
    }
    # each remote-code script gets its own copy: no two processes write one module-cache folder at once
    folders = {name: tiny_dsg_folder(tmp / name) for name in ("gen", "pipe", "explain", "offload", "auto")}
    started = {}

    def start(name, script, *args):
        started[name] = Run(name, script, args, tmp, env)

    try:
        start(
            "generate",
            "load_and_generate.py",
            "--model",
            folders["gen"],
            "--prompt",
            "hello world",
            "--chat",
            "--max-new-tokens",
            6,
        )
        start(
            "pipeline",
            "pipeline_generate.py",
            "--model",
            folders["pipe"],
            "hello",
            "the cell membrane is",
            "--max-new-tokens",
            6,
        )
        start("explain", "explain_text.py", "--model", folders["explain"], "viruses replicate in cells")
        start("offload", "device_map_offload.py", "--model", folders["offload"])
        start(
            "auto",
            "device_map_offload.py",
            "--model",
            folders["auto"],
            "--device-map",
            "auto",
            "--max-memory",
            "120KB",
        )
        start(
            "bad_build",
            "build_guardrail.py",
            "--base",
            tmp / "base",
            "--sae",
            tmp / "sae",
            "--forget",
            tmp / "nope.txt",
            "--retain",
            tmp / "nope.txt",
            "--out",
            tmp / "bad",
        )
        base = tiny.tiny_base("llama")
        base.save_pretrained(tmp / "base")
        tiny.tiny_tokenizer().save_pretrained(tmp / "base")
        (tmp / "forget.txt").write_text("\n\n".join(FORGET * 6))
        (tmp / "retain.txt").write_text("\n\n".join(RETAIN * 6))
        tiny_sae_folder(tmp / "sae")
        start(
            "build",
            "build_guardrail.py",
            "--base",
            tmp / "base",
            "--sae",
            tmp / "sae",
            "--forget",
            tmp / "forget.txt",
            "--retain",
            tmp / "retain.txt",
            "--out",
            tmp / "built",
            "--name",
            "biology",
            "--n-features",
            5,
            "--ratio-percentile",
            50,
            "--clamp",
            8,
            "--seq-len",
            32,
            "--batch-size",
            16,
        )
        yield tmp, started
    finally:
        for run in started.values():  # a failed test may leave one running
            run.stop()


def ok(runs, name) -> str:
    code, out = runs[1][name].result()
    assert code == 0, f"{name} exited with {code}:\n{out}"
    return out


def test_load_and_generate(runs):
    out = ok(runs, "generate")
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["prompt"] == "'hello world'"
    assert "guardrail 'topic' (layer 2): rho on the prompt = " in out and "tau = 0.000 -> fired on the prompt" in out
    assert "guardrail 'never' (layer 1): rho on the prompt = " in out and "tau = 1.000 -> not fired" in out
    assert lines["base"] != lines["DSG"]  # "topic" fired and clamped its features: the output changed


def test_pipeline_generate(runs):
    lines = [line for line in ok(runs, "pipeline").splitlines() if line.startswith("[")]
    assert len(lines) == 2
    for line, prompt in zip(lines, ["hello", "the cell membrane is"]):
        names, text = line[1:].split("] ", 1)
        assert names == "fired: topic"  # tau = 0: fired on both rows; "never" on neither
        assert text.startswith(repr(prompt)[:-1]) and len(text) > len(repr(prompt))  # the prompt, then new text


def test_explain_text(runs):
    out = ok(runs, "explain")
    assert "guardrail 'topic' (layer 2, dynamic, action clamp): rho = " in out and "-> FIRED" in out
    assert "guardrail 'never' (layer 1, dynamic, action clamp): rho = " in out and "-> not fired" in out
    assert "guardrail 'topic': features active on the most tokens" in out


@pytest.mark.parametrize("name", ["offload", "auto"])
def test_device_map_offload(runs, name):
    out = ok(runs, name)
    disk = next(line for line in out.splitlines() if "on disk: " in line).split("on disk: ")[1]
    assert "guards" in disk and "layers.3" in disk  # the guardrails and at least one block really were offloaded
    assert "logits identical to the plain load: True; decisions identical: True" in out


def test_build_guardrail(runs):
    tmp, _ = runs
    out = ok(runs, "build")
    assert "guardrail 'biology': layer 1, " in out and f"wrote {tmp / 'built'}" in out
    from modeling_dsg import DSGForCausalLM

    model = DSGForCausalLM.from_pretrained(tmp / "built").eval()
    guard = model.guard("biology")
    assert guard.layer == 1 and 1 <= len(guard.features) <= 5 and guard.clamp == 8.0
    # the random SAE's features do not separate the corpora: the default score "features" finds no feature to weigh
    # and the window score's learned token gate would flag nothing, so the build keeps the window score with the
    # paper's token gate (said on stderr and recorded); its few retain rows cannot show a 0.025 bound either
    record = json.loads((tmp / "built" / "dsg_build.json").read_text())["guardrails"][0]
    fallback = record["token_gate"]["fallback"]
    assert record["token_gate"]["gate"] == "any" and fallback.startswith("score features: no SAE feature is active")
    assert "would flag no token" in fallback
    assert record["calibration"]["rule"] == "percentile" and record["calibration"]["fallback"]["target_fpr"] == 0.025
    (g,) = json.loads((tmp / "built" / "config.json").read_text())["guardrails"]
    assert g["score"] == "window" and "token_weights" not in g
    assert "warning: the token gate is the paper's (any selected feature), not the learned one: score features" in out
    assert "warning: tau is the 95th percentile of retain rho (the paper's rule)" in out
    assert (tmp / "built" / "features.json").is_file() and (tmp / "built" / "dsg_build.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 50, 60, 70]])).logits).all()


def test_build_guardrail_bad_input_is_one_clear_line(runs):
    tmp, started = runs
    code, out = started["bad_build"].result()
    assert code == 1 and out.strip().splitlines() == [f"error: text source {tmp / 'nope.txt'} does not exist"]
    assert not (tmp / "bad").exists()
