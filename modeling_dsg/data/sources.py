"""Where models, SAEs and texts come from: local folders, GGUF files, sae-lens releases, text files and the Hub.

Every loader accepts a local path first and a Hub id second, because most machines that run the
tests cannot reach the Hub. A Hub id that cannot be fetched fails within seconds with a `DSGError`
that says to pass a local path instead.

Models (`load_base_model`)
    * a local folder written by `save_pretrained`;
    * a local `.gguf` file: dequantized once into a cached
      safetensors folder `cache_dir()/gguf/<name>-<key>/` (model, tokenizer, generation config), where
      `key` is the first 12 hex digits of sha256(file size, first 4 MiB, last 1 MiB). Later loads read
      that folder. The folder is written atomically, so an interrupted conversion leaves
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
    Text files must be UTF-8 (a BOM is allowed); a file that is not (Latin-1, UTF-16, binary, NUL bytes), a
    `.jsonl` line that is not a JSON object, a text field that is not a string, question/choices records
    without a list of string choices and a corrupt `.parquet` are each one `DSGError` naming the file
    (and the line or record).

Checks (`check_device`, `load_dsg_model`, `check_finite`)
    Every loader here turns what a bad file raises (SafetensorError, a size mismatch, a missing tokenizer,
    a config that does not match the weights, ...) into one `DSGError` line naming the file, and keeps
    transformers' load report and progress bar off the terminal. A base model folder must hold a
    tokenizer and readable safetensors weights that match its config.json exactly (no missing, unexpected
    or misshapen tensors) and are finite; a DSG folder is refused as a base model. An SAE folder's
    cfg.json must be a JSON object whose sizes are in range and agree with the weights, which must be finite.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from pathlib import Path

from ..errors import DSGError
from ..paths import atomic_output_dir, cache_dir
from .hub import is_repo_id, parse_dataset_spec, require_hub

_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


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
        if path.is_dir():
            raise DSGError(f"GGUF file {spec} is a folder, not a .gguf file")
        if not path.is_file():
            raise DSGError(f"GGUF file {spec} does not exist")
        return str(_convert_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DSGError(f"model folder {spec} has no config.json")
        return str(path.resolve())
    if path.exists() or not is_repo_id(spec) or spec.startswith((".", "/", "~")):
        raise DSGError(f"model {spec} is not a model folder, a .gguf file or a Hub id")
    require_hub(spec, "model", "pass a local folder or .gguf file (no local folder of that name exists)")
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
        raise DSGError(f"cannot load GGUF file {path}: {one_line(err)}") from None
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

    `dtype` defaults to `torch.float32`. The model is returned in eval mode on `device`. A local folder
    must be a plain model (not a DSG folder) with a tokenizer and readable weights; weights missing from
    the checkpoint, weights the config has no place for, weights whose shape disagrees with config.json and
    non-finite weights are each a `DSGError`.
    """
    where = resolve_model_dir(spec)  # before the heavy imports: a bad spec fails at once
    if Path(where).is_dir():
        _check_base_folder(Path(where), spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model, info = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
            )
        except LOAD_ERRORS as err:
            raise DSGError(f"cannot load model {spec}: {one_line(err)}") from None
    _check_loading_info(info, f"model {spec}")
    check_finite(model.state_dict().items(), f"model {spec}")
    return to_device(model, device, f"model {spec}").eval(), tok


def _check_base_folder(folder: Path, spec: str) -> None:
    """A local base model folder: a plain model's config.json, a tokenizer, readable safetensors weights."""
    config = read_json_file(folder / "config.json", "model config")
    if not isinstance(config, dict):
        raise DSGError(f"model folder {spec}: config.json must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type") == "dsg":
        build = folder / "dsg_build.json"
        recorded = ""
        try:
            base = json.loads(build.read_text(encoding="utf-8")).get("base_model") if build.is_file() else None
            recorded = f" ({base})" if isinstance(base, str) and base else ""
        except (OSError, ValueError, AttributeError):
            pass
        raise DSGError(
            f"{spec} is a DSG model folder, not a base model: pass the base model it was built from{recorded}"
        )
    check_tokenizer_files(folder, f"model folder {spec}")
    check_weight_files(folder, f"model folder {spec}")


def _check_loading_info(info: dict, what: str) -> None:
    """transformers' `output_loading_info`: every weight in its place, with its shape."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, ckpt, model = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise DSGError(
            f"{what}: its config.json does not match its weights: {key} has shape {tuple(ckpt)} in the "
            f"checkpoint but {tuple(model)} by config.json{more} (check hidden_size and the other sizes)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DSGError(
            f"{what}: the checkpoint has no {missing[0]}{more}; it would be left random "
            "(a damaged checkpoint, or config.json does not match it, e.g. tie_word_embeddings)"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise DSGError(
            f"{what}: the checkpoint holds {unexpected[0]}{more}, which config.json has no place for "
            "(config.json does not match the checkpoint, e.g. num_hidden_layers)"
        )


# -------------------------------------------------------------------------------------------- SAEs
def load_sae(spec: str, *, device: str = "cpu"):
    """Load a sae-lens `SAE` from a folder on disk or from `RELEASE:SAE_ID`; its weights must be finite."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise DSGError(f"SAE folder {spec} has no cfg.json (expected a sae-lens folder)")
        _check_sae_folder(path, spec)
        from sae_lens import SAE

        try:
            sae = SAE.load_from_disk(str(path), device=device)
        except LOAD_ERRORS as err:
            raise DSGError(f"cannot load the SAE in {spec}: {one_line(err)}") from None
        check_finite(sae.state_dict().items(), f"the SAE in {spec}")
        return sae
    if ":" not in spec or path.exists() or spec.startswith((".", "/", "~")):
        raise DSGError(f"SAE {spec} is not a sae-lens folder or RELEASE:SAE_ID")
    release, sae_id = spec.split(":", 1)
    require_hub(spec, "SAE", "pass a local sae-lens folder")
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except LOAD_ERRORS as err:
        raise DSGError(f"cannot load SAE {spec}: {one_line(err)}") from None
    check_finite(sae.state_dict().items(), f"SAE {spec}")
    return sae


SAE_WEIGHTS = "sae_weights.safetensors"


def _check_sae_folder(path: Path, spec: str) -> None:
    """cfg.json: a JSON object with a known architecture and in-range sizes; the weights: readable, with the
    shapes cfg.json gives. Runs before sae-lens sees the folder, so nothing large is allocated for a bad one."""
    from ..runtime.configuration_dsg import MAX_D_SAE

    where = f"SAE folder {spec}"
    cfg = read_json_file(path / "cfg.json", "SAE config")
    if not isinstance(cfg, dict):
        raise DSGError(f"{where}: cfg.json must hold a JSON object, got {type(cfg).__name__}")
    sizes = {}
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_D_SAE:
            raise DSGError(f"{where}: cfg.json's {key} must be an integer in [1, {MAX_D_SAE}], got {value!r}")
        sizes[key] = value
    arch = cfg.get("architecture", "standard")
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if not isinstance(arch, str) or (SAE_CLASS_REGISTRY and arch not in SAE_CLASS_REGISTRY):
        known = ", ".join(sorted(SAE_CLASS_REGISTRY))
        raise DSGError(f"{where}: cfg.json names an unknown SAE architecture {arch!r} (sae-lens knows {known})")
    weights = path / SAE_WEIGHTS
    if not weights.is_file():
        raise DSGError(f"{where} has no {SAE_WEIGHTS}" + (" (it is a folder)" if weights.is_dir() else ""))
    shapes = safetensors_shapes(weights, where)
    d_in, d_sae = sizes["d_in"], sizes["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise DSGError(
                f"{where}: {name} has shape {shapes[name]} in {SAE_WEIGHTS}, but cfg.json "
                f"(d_in {d_in}, d_sae {d_sae}) gives {shape}"
            )


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


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 bytes (an optional BOM) as text; anything else (Latin-1, UTF-16, binary) is a `DSGError` naming
    `where` and the line."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DSGError(f"{where} is UTF-16 text, not UTF-8; save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DSGError(
            f"{where}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); a binary file, or text in "
            "another encoding (e.g. Latin-1)? save it as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DSGError(f"{where}:{line}: holds NUL bytes; a binary file, not text")
    return text


def _read_file(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise DSGError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise DSGError(f"{what} {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    try:
        return path.read_bytes()
    except OSError as err:
        raise DSGError(f"cannot read {what} {path}: {err.strerror or err}") from None


def read_jsonl(path, *, objects: bool = False) -> list:
    """Records of a JSON-lines file (blank lines skipped); `objects`: every record must be a JSON object."""
    path = Path(path)
    if path.is_dir():
        raise DSGError(f"{path} is a folder, not a .jsonl file")
    if not path.is_file():
        raise DSGError(f"{path} " + ("is not a regular file" if path.exists() else "does not exist"))
    text = decode_text(_read_file(path, "file"), str(path))
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DSGError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if objects and not isinstance(record, dict):
                raise DSGError(
                    f"{path}:{n}: a JSON {_json_kind(record)}, not an object; each line must be one "
                    'record such as {"text": ...}'
                )
            rows.append(record)
    return rows


def _json_kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


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
    """The texts of records: the `text` (or `text_field`) strings, or question/choices records as prompts."""
    records = list(records)
    if not records:
        return []
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise DSGError(f"{source}: record {n} is a JSON {_json_kind(r)}, not an object")
    first = records[0]
    field = text_field or ("text" if "text" in first else None)
    if field is not None:
        if field not in first:
            raise DSGError(f"{source} has no field {field!r} (fields: {sorted(map(str, first))})")
        texts = []
        for n, r in enumerate(records, 1):
            value = r.get(field)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise DSGError(
                    f"{source}: record {n}: field {field!r} must be a string, got {_json_kind(value)} "
                    f"{_short_repr(value)}"
                )
            texts.append(value)
        return texts
    if "question" in first and "choices" in first:
        return [mcq_prompt(*_mcq_fields(r, source, n)) for n, r in enumerate(records, 1)]
    raise DSGError(
        f"{source} has neither a 'text' field nor question/choices records (fields: {sorted(map(str, first))})"
    )


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mcq_fields(record: dict, source: str, n: int) -> tuple[str, list[str]]:
    """(question, choices) of a question/choices record; anything else is a `DSGError` naming the record."""
    where = f"{source}: record {n}"
    missing = [k for k in ("question", "choices") if k not in record]
    if missing:
        raise DSGError(
            f"{where} has no {' or '.join(repr(k) for k in missing)} field (question/choices records "
            f"need both; found {', '.join(sorted(map(str, record))) or 'nothing'})"
        )
    question, choices = record["question"], record["choices"]
    if not isinstance(question, str) or not question.strip():
        raise DSGError(f"{where}: 'question' must be a non-empty string, got {_short_repr(question)}")
    if not isinstance(choices, (list, tuple)) or not 1 <= len(choices) <= 10:
        got = (
            f"{len(choices)} choices"
            if isinstance(choices, (list, tuple))
            else f"{_json_kind(choices)} {_short_repr(choices)}"
        )
        raise DSGError(f"{where}: 'choices' must be a list of 1 to 10 strings, got {got}")
    bad = next((c for c in choices if not isinstance(c, str)), None)
    if bad is not None:
        raise DSGError(f"{where}: every choice must be a string, got {_json_kind(bad)} {_short_repr(bad)}")
    return question, list(choices)


def load_texts(spec: str, *, text_field: str | None = None, limit: int | None = None) -> list[str]:
    """Texts from a `.txt`, `.jsonl` or `.parquet` file, or a Hub data set `NAME[:CONFIG][@SPLIT]`."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".jsonl", ".parquet") or path.exists():
        if path.is_dir():
            raise DSGError(f"text source {spec} is a folder, not a file")
        if not path.is_file():
            raise DSGError(f"text source {spec} " + ("is not a regular file" if path.exists() else "does not exist"))
        if suffix == ".jsonl":
            texts = _records_to_texts(read_jsonl(path, objects=True), spec, text_field)
        elif suffix == ".parquet":
            texts = _records_to_texts(read_parquet(path, spec), spec, text_field)
        else:
            raw = decode_text(_read_file(path, "text source"), spec)
            if any(_WIKI_TITLE.match(line) for line in raw.split("\n")):
                texts = split_wikitext(raw)
            else:
                texts = [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    else:
        parsed = parse_dataset_spec(spec, default_split="train")
        if parsed is None:
            raise DSGError(f"text source {spec} is not a file or a Hub data set NAME[:CONFIG][@SPLIT]")
        name, config, split = parsed
        require_hub(spec, "data set", "pass a local .txt, .jsonl or .parquet file")
        import datasets

        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as err:
            raise DSGError(f"cannot load data set {spec}: {one_line(err)}") from None
        texts = _records_to_texts(ds, spec, text_field)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise DSGError(f"text source {spec} is empty")
    return texts


def load_sources(specs, text_field: str | None = None) -> tuple[list[str], list[str]]:
    """(all texts, the specs as strings) of one text source or a list of them (`load_texts` each, in order)."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    specs = [str(s) for s in specs]
    if not specs:
        raise DSGError("no text source given")
    texts = []
    for spec in specs:
        texts += load_texts(spec, text_field=text_field)
    return texts, specs


def read_parquet(path, source: str | None = None) -> list[dict]:
    """The records of a local .parquet file; a file that is not one is a `DSGError` naming it."""
    path = Path(path)
    source = source or str(path)
    if path.is_dir():
        raise DSGError(f"{source} is a folder, not a .parquet file")
    import pyarrow.parquet as pq

    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception as err:  # ArrowInvalid, OSError, ...: the file is not a readable parquet file
        raise DSGError(f"cannot read {source}: not a valid parquet file ({one_line(err)})") from None


# --------------------------------------------------------------------------------- checks and loading
# What a loader (transformers, tokenizers, sae-lens, safetensors, huggingface_hub) raises on a bad file: many
# unrelated classes (SafetensorError, StrictDataclassFieldValidationError, tokenizers' plain Exception, KeyError,
# AttributeError on a config of the wrong shape, ...). Each `except LOAD_ERRORS` here wraps only the loading call
# itself, so what it catches comes from the file being loaded and becomes one DSGError line naming it.
LOAD_ERRORS = (Exception,)
ONE_LINE_CHARS = 400


def one_line(err) -> str:
    """An exception (or text) as one line: its lines joined, ANSI colours dropped, at most ONE_LINE_CHARS."""
    text = str(err) if not isinstance(err, BaseException) else (str(err) or type(err).__name__)
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= ONE_LINE_CHARS else text[: ONE_LINE_CHARS - 3] + "..."


@contextlib.contextmanager
def quiet_transformers():
    """No transformers load report or progress bar while loading: a bad file ends in one DSGError line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_json_file(path, what: str):
    """Parse a UTF-8 JSON file; a missing, unreadable or broken one is a `DSGError` naming it."""
    path = Path(path)
    raw = _read_file(path, what)
    try:
        return json.loads(decode_text(raw, f"{what} {path}"))
    except json.JSONDecodeError as err:
        raise DSGError(f"cannot read {what} {path}: not valid JSON ({err})") from None


def check_dsg_folder(model_dir) -> dict:
    """The parsed config.json of a DSG model folder, or a `DSGError` saying what is wrong with the folder."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise DSGError(f"model folder {model_dir} does not exist")
    if not model_dir.is_dir():
        raise DSGError(f"{model_dir} is not a folder (expected a DSG model folder written by `dsg build`)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise DSGError(f"{model_dir} is not a DSG model folder: it has no config.json")
    config = read_json_file(config_path, "model config")
    if not isinstance(config, dict) or config.get("model_type") != "dsg":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise DSGError(f"{model_dir} is not a DSG model folder: config.json has model_type {found!r}, expected 'dsg'")
    return config


def check_device(device) -> str:
    """`device` if torch knows it and this machine has it; `DSGError` otherwise (before any work is done)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DSGError(f"--device {device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "meta":
        raise DSGError("--device meta holds no data; give a real device (cpu, cuda, ...)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            how = "no CUDA device is visible" if torch.version.cuda else "this torch is built without CUDA"
            raise DSGError(f"--device {device}: CUDA is not available on this machine ({how}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DSGError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DSGError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as err:  # torch raises several kinds for an absent backend
            raise DSGError(f"--device {device} is not available on this machine ({one_line(err)})") from None
    return device


def to_device(model, device, what: str):
    """`model.to(device)`; an unavailable device is a `DSGError`."""
    if device is None:
        return model
    check_device(device)
    try:
        return model.to(device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise DSGError(f"cannot move {what} to {device}: {one_line(err)}") from None


TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
    "qwen.tiktoken",
    "vocab.model",
)


def check_tokenizer_files(folder: Path, what: str) -> None:
    """A local model folder must hold a tokenizer (else transformers blames sentencepiece or tiktoken)."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise DSGError(
        f"{what} has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json, ...); save the "
        "tokenizer next to the model with tokenizer.save_pretrained(folder)"
    )


def safetensors_shapes(path: Path, what: str) -> dict:
    """{tensor name: shape} from a safetensors file's header; an empty, truncated or garbage file is a `DSGError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except LOAD_ERRORS as err:
        size = path.stat().st_size if path.exists() else 0
        hint = "the file is empty" if size == 0 else "the file is truncated or not a safetensors file"
        raise DSGError(f"{what}: {path.name} cannot be read ({hint}: {one_line(err)})") from None


def check_weight_files(folder: Path, what: str) -> None:
    """Every safetensors weight file of a model folder (model.safetensors, or the index and its shards) has a
    readable header that covers the whole file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json_file(index, "weight index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise DSGError(f"{what}: {index.name} has no weight_map of tensor names to files")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise DSGError(f"{what}: the weight file {name} listed in {index.name} is missing")
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else []
    for name in files:
        if (folder / name).is_dir():
            raise DSGError(f"{what}: {name} is a folder, not a weight file")
        safetensors_shapes(folder / name, what)


def check_finite(named_tensors, what: str) -> None:
    """Every floating tensor of `named_tensors` ((name, tensor) pairs) is finite; else a `DSGError` naming one."""
    import torch

    for name, tensor in named_tensors:
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or not tensor.numel():
            continue
        tensor = tensor.detach()
        try:  # one reduction, no copy: a NaN or inf anywhere makes the float64 sum non-finite
            total = tensor.sum(dtype=torch.float64)
        except (RuntimeError, TypeError):  # a device without float64 (MPS)
            total = tensor.float().sum()
        if torch.isfinite(total):
            continue
        bad = tensor[~torch.isfinite(tensor)]
        if not bad.numel():  # a finite tensor whose float64 sum overflowed: not possible below 1e308 per element
            continue
        kind = "NaN" if torch.isnan(bad).any() else "infinite values"
        raise DSGError(f"{what}: {name} contains {kind} ({bad.numel()} of {tensor.numel()} values)")


def load_dsg_model(folder, *, device: str | None = "cpu", dtype=None, what: str | None = None):
    """A DSG model folder as (DSGForCausalLM in eval mode, tokenizer, parsed config.json), loaded with this
    package's classes. Everything a bad folder raises is one `DSGError` line: a config.json that is not
    UTF-8 JSON or not a DSG config, a 'guardrails' that is not a list of objects, no tokenizer, weights that
    are empty, truncated or garbage, tensors that disagree with the config, an unavailable device."""
    from transformers import AutoTokenizer

    from .. import DSGForCausalLM

    folder = Path(folder).expanduser()
    what = what or f"the DSG model in {folder}"
    config = check_dsg_folder(folder)
    guardrails = config.get("guardrails", [])
    if not isinstance(guardrails, list) or not all(isinstance(g, dict) for g in guardrails):
        raise DSGError(
            f"{folder}/config.json: 'guardrails' must be a list of guardrail objects, got {_short_repr(guardrails)}"
        )
    check_tokenizer_files(folder, what)
    check_weight_files(folder, what)
    kwargs = {} if dtype is None else {"dtype": dtype}
    with quiet_transformers():
        try:
            model = DSGForCausalLM.from_pretrained(str(folder), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except LOAD_ERRORS as err:
            raise DSGError(f"cannot load {what}: {one_line(err)}") from None
    return to_device(model, device, what).eval(), tokenizer, config
