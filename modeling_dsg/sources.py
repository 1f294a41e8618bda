"""Where models, SAEs and texts come from: local folders, GGUF files, sae-lens releases, text files and the Hub.

Every loader accepts a local path first and a Hub id second, because most machines that run the
tests cannot reach the Hub. A Hub id that cannot be fetched fails within seconds with a `DSGError`
that says to pass a local path instead.

Models (`load_base_model`)
    * a local folder written by `save_pretrained`;
    * a local `.gguf` file: dequantized once (about 26 s for SmolLM2-135M on 2 cores) into a cached
      safetensors folder `cache_dir()/gguf/<name>-<key>/` (model, tokenizer, generation config), where
      `key` is the first 12 hex digits of sha256(file size, first 4 MiB, last 1 MiB). Later loads read
      that folder (about 1 s). The folder is written atomically, so an interrupted conversion leaves
      nothing behind;
    * a Hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`.

SAEs (`load_sae`, `sae_layer`)
    * a sae-lens folder (`cfg.json` + `sae_weights.safetensors`) via `SAE.load_from_disk`;
    * `RELEASE:SAE_ID` via `SAE.from_pretrained` (sae-lens 6 returns only the SAE).

Texts (`load_texts`)
    * `.txt`: documents separated by blank lines; a WikiText-style file (article titles as lines
      ` = Title = `) gives one document per top-level article instead;
    * `.jsonl` / `.parquet`: the `text` field (or `text_field`), or multiple-choice records
      (`question` + `choices`) turned into prompts with `mcq_prompt`;
    * `NAME[:CONFIG][@SPLIT]`: a Hub data set through `datasets.load_dataset` (default split `train`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

from .errors import DSGError
from .paths import atomic_output_dir, cache_dir

HUB_TIMEOUT_S = 5.0

_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


# --------------------------------------------------------------------------------------------- hub
def _hub_offline() -> bool:
    """True if Hub downloads are disabled (HF_HUB_OFFLINE) or the Hub does not answer within seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    import socket
    from urllib.parse import urlparse

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S):
            return False
    except OSError:
        return True


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec))


def _require_hub(spec: str, what: str, hint: str) -> None:
    if _hub_offline():
        raise DSGError(f"cannot reach the Hugging Face Hub to fetch {what} {spec!r}; {hint}")


# ------------------------------------------------------------------------------------------ models
def _gguf_key(path: Path) -> str:
    """Cheap content key: sha256 over the size, the first 4 MiB and the last 1 MiB of the file."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > (5 << 20):
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:12]


def resolve_model_dir(spec: str) -> str:
    """The local folder `load_base_model(spec)` loads from; a GGUF is converted (once) into the cache.

    Returns `spec` unchanged for a Hub id (after checking the Hub is reachable).
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise DSGError(f"GGUF file {spec} does not exist")
        return str(_convert_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DSGError(f"model folder {spec} has no config.json")
        return str(path.resolve())
    if path.exists() or not _looks_like_hub_id(spec) or spec.startswith((".", "/", "~")):
        raise DSGError(f"model {spec} is not a model folder, a .gguf file or a Hub id")
    _require_hub(spec, "model", "pass a local folder or .gguf file (no local folder of that name exists)")
    return spec


def _convert_gguf(path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = cache_dir() / "gguf" / f"{path.stem}-{_gguf_key(path)}"
    if (out / "config.json").is_file():
        return out
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # a corrupt or unsupported file
        raise DSGError(f"cannot load GGUF file {path}: {err}") from err
    # A GGUF-loaded model carries a GGUF quantizer and refuses save_pretrained; its weights are
    # already dequantized, so rebuild a plain model from the config (minus quantization_config).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    try:
        with atomic_output_dir(out, overwrite=True) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                GenerationConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
            except Exception:
                model.generation_config.save_pretrained(tmp)
    except OSError:
        if not (out / "config.json").is_file():  # lost a race with another process: fine if it won
            raise
    return out


def load_base_model(spec: str, *, dtype=None, device: str = "cpu"):
    """Load `(model, tokenizer)` from a folder, a `.gguf` file (cached conversion) or a Hub id.

    `dtype` defaults to `torch.float32`. The model is returned in eval mode on `device`.
    """
    where = resolve_model_dir(spec)  # before the heavy imports: a bad spec fails at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as err:
        raise DSGError(f"cannot load model {spec}: {err}") from err
    return model.to(device).eval(), tok


# -------------------------------------------------------------------------------------------- SAEs
def load_sae(spec: str, *, device: str = "cpu"):
    """Load a sae-lens `SAE` from a folder on disk or from `RELEASE:SAE_ID`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise DSGError(f"SAE folder {spec} has no cfg.json (expected a sae-lens folder)")
        from sae_lens import SAE

        return SAE.load_from_disk(str(path), device=device)
    if ":" not in spec or path.exists() or spec.startswith((".", "/", "~")):
        raise DSGError(f"SAE {spec} is not a sae-lens folder or RELEASE:SAE_ID")
    release, sae_id = spec.split(":", 1)
    _require_hub(spec, "SAE", "pass a local sae-lens folder")
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except (ValueError, KeyError, OSError) as err:
        raise DSGError(f"cannot load SAE {spec}: {err}") from err


def sae_layer(sae) -> int | None:
    """The layer index in the SAE's hook name (`model.layers.L`, `blocks.L.hook_resid_post`, `transformer.h.L`...)."""
    cfg = getattr(sae, "cfg", sae)
    meta = getattr(cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
    if not name:
        return None
    m = re.search(r"(?:layers|blocks|h|layer)\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- texts
def mcq_prompt(question: str, choices: list[str]) -> str:
    """The lm-eval-harness WMDP/MMLU prompt: question, `A. ..` to `D. ..` lines, then `Answer:`."""
    lines = [question.strip()] + [f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def read_jsonl(path) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DSGError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DSGError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    return rows


def split_wikitext(raw: str) -> list[str]:
    """One document per top-level WikiText article (title lines ` = Title = ` start a new article)."""
    docs, cur = [], []
    for line in raw.split("\n"):
        if _WIKI_TITLE.match(line) and cur:
            docs.append("\n".join(cur).strip())
            cur = []
        cur.append(line)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if d]


def _records_to_texts(records, source: str, text_field: str | None) -> list[str]:
    records = list(records)
    if not records:
        return []
    first = records[0]
    field = text_field or ("text" if "text" in first else None)
    if field is not None:
        if field not in first:
            raise DSGError(f"{source} has no field {field!r} (fields: {sorted(first)})")
        return [str(r[field]) for r in records if r.get(field)]
    if "question" in first and "choices" in first:
        return [mcq_prompt(r["question"], list(r["choices"])) for r in records]
    raise DSGError(f"{source} has neither a 'text' field nor question/choices records (fields: {sorted(first)})")


def load_texts(spec: str, *, text_field: str | None = None, limit: int | None = None) -> list[str]:
    """Texts from a `.txt`, `.jsonl` or `.parquet` file, or a Hub data set `NAME[:CONFIG][@SPLIT]`."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".jsonl", ".parquet") or path.exists():
        if not path.is_file():
            raise DSGError(f"text source {spec} does not exist")
        if suffix == ".jsonl":
            texts = _records_to_texts(read_jsonl(path), spec, text_field)
        elif suffix == ".parquet":
            import datasets

            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            texts = _records_to_texts(ds, spec, text_field)
        else:
            raw = path.read_text(encoding="utf-8")
            if any(_WIKI_TITLE.match(line) for line in raw.split("\n")):
                texts = split_wikitext(raw)
            else:
                texts = [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    else:
        m = re.fullmatch(r"([\w.\-]+(?:/[\w.\-]+)?)(?::([\w.\-]+))?(?:@([\w.\-\[\]:%+]+))?", spec)
        if not m:
            raise DSGError(f"text source {spec} is not a file or a Hub data set NAME[:CONFIG][@SPLIT]")
        name, config, split = m.group(1), m.group(2), m.group(3) or "train"
        _require_hub(spec, "data set", "pass a local .txt, .jsonl or .parquet file")
        import datasets

        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as err:
            raise DSGError(f"cannot load data set {spec}: {err}") from err
        texts = _records_to_texts(ds, spec, text_field)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise DSGError(f"text source {spec} is empty")
    return texts
