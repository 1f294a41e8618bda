"""`dsg publish`: stage a DSG model folder with its model card, check that it loads, upload it in one commit.

    dsg publish DIR --repo-id OWNER/NAME [--private] [--revision REV] [--dry-run STAGING [--overwrite]]
                    [--token TOKEN] [--eval EVAL_DIR] [--base-model HUB_ID] [--license ID]

Steps, in order (the first failure ends the run with one `DSGError`; nothing is uploaded before step 5):

1. **Inputs.** DIR must be a DSG model folder (config.json with model_type "dsg", the code modules its
   `auto_map` names and their single-dot relative imports, safetensors weights, tokenizer files);
   the repo id must be OWNER/NAME; `--verify-timeout` a finite number of seconds > 0. The code files must
   be byte-identical to the ones this package ships (configuration_dsg.py, modeling_dsg.py, guard_dsg.py,
   sae_dsg.py): step 4 runs them, and the Hub serves them to every user. Code that differs, or modules
   the package does not ship, are refused unless `--allow-custom-code` is given.
2. **Hub access** (skipped by `--dry-run`). The token is `--token`, else `HF_TOKEN`, else the saved login
   (`huggingface_hub.get_token()`); none is an error at once. Then the Hub must answer within seconds:
   a TCP connection to the endpoint (`HF_ENDPOINT`, default https://huggingface.co) with a
   `HUB_TIMEOUT_S` timeout, then `whoami` (bounded by `WHOAMI_TIMEOUT_S`), which also rejects a bad or
   read-only token, or an OWNER the token cannot write to. This happens before any repo is created.
3. **Stage** into a temporary folder (or STAGING for `--dry-run`, written atomically: it appears only
   if staging and verification succeed). Staged files, flat as in the source folder:
   config.json, generation_config.json, the code files, model.safetensors or the shards listed in
   model.safetensors.index.json (with the index), the tokenizer files present, features.json,
   dsg_build.json, LICENSE/NOTICE files, `README.md` (the card from `cards.render_card`, replacing any
   README in DIR), and `eval/report.json` + `eval/*.png` from the eval folder (`--eval`, default
   DIR/eval). Weights are hard-linked when the file system allows it, everything else is copied.
4. **Verify** in a fresh Python subprocess that has never imported this package, started outside the
   repository with `HF_HUB_OFFLINE=1` and a private transformers module cache:
   `AutoTokenizer` and `AutoModelForCausalLM.from_pretrained(staged, trust_remote_code=True)`, one
   short forward pass, finite logits, and a model class loaded from the staged code
   (`transformers_modules.*`). Bounded by `--verify-timeout` (default 600 s).
5. **Upload** (skipped by `--dry-run`): `create_repo(exist_ok=True, private=...)`, `create_branch` for a
   `--revision` other than main, then **one** `create_commit` holding every staged file. If the commit
   fails and the repo did not exist before, the empty repo is deleted again.

`--dry-run STAGING` stops after step 4 and prints every staged file with its size, and the total.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..data.hub import HUB_TIMEOUT_S, connect, is_repo_id
from ..data.sources import check_dsg_folder, read_json_file
from ..errors import DSGError
from ..outputs import prepare_output
from ..paths import atomic_output_dir
from .cards import render_card

WHOAMI_TIMEOUT_S = 10.0
VERIFY_TIMEOUT_S = 600.0

MODEL_FILES = ("config.json", "generation_config.json")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
DSG_FILES = ("features.json", "dsg_build.json")
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")

# Run by the verification subprocess: `python -c VERIFY_SCRIPT STAGED_DIR`. Prints one JSON line.
VERIFY_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
batch = tokenizer("Rainbows form when", return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
if not torch.isfinite(logits).all():
    raise SystemExit("ValueError: the staged model gives non-finite logits")
module = type(model).__module__
if "modeling_dsg" in sys.modules or not module.startswith("transformers_modules"):
    raise SystemExit(f"RuntimeError: the model class came from {module}, not from the staged remote code")
print(json.dumps({"class": type(model).__name__, "module": module, "logits_shape": list(logits.shape),
                  "seconds": round(time.perf_counter() - t0, 2)}))
"""


# ----------------------------------------------------------------------------------------- inputs
def check_repo_id(repo_id) -> str:
    """Accept OWNER/NAME as the Hub names repos; anything else is a `DSGError`."""
    if (
        not isinstance(repo_id, str)
        or not is_repo_id(repo_id)
        or not repo_id.split("/")[1][:1].isascii()
        or not repo_id.split("/")[1][:1].isalnum()
        or ".." in repo_id
        or "--" in repo_id
        or repo_id.endswith(".git")
        or len(repo_id) > 96
    ):
        raise DSGError(
            f"bad repo id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.'; "
            f"no '--' or '..'; at most 96 characters)"
        )
    return repo_id


def code_files(model_dir: Path, config: dict) -> list[str]:
    """The `.py` files the folder's `auto_map` needs: the named modules and their relative imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    entries = []
    for section in (config.get("auto_map") or {}, (_tokenizer_config(model_dir).get("auto_map") or {})):
        for value in section.values():
            entries.extend(value if isinstance(value, (list, tuple)) else [value])
    modules = sorted({e.rsplit(".", 1)[0] for e in entries if isinstance(e, str) and "--" not in e and "." in e})
    if not modules:
        raise DSGError(f"{model_dir}/config.json has no auto_map: the folder would not load with trust_remote_code")
    files = []
    for module in modules:
        path = model_dir / f"{module}.py"
        if not path.is_file():
            raise DSGError(f"{model_dir} is missing {path.name}, which config.json's auto_map names")
        try:
            needed = [Path(p) for p in get_relative_import_files(str(path))]
        except FileNotFoundError as err:
            raise DSGError(f"{model_dir} is missing {Path(err.filename).name}, imported by the model code") from None
        for p in [path, *needed]:
            if p.name not in files:
                files.append(p.name)
    return sorted(files)


RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"  # the code that travels to the Hub
SHIPPED_CODE = tuple(sorted(p.name for p in RUNTIME_DIR.glob("*_dsg.py")))


def custom_code(model_dir: Path, config: dict) -> list[str]:
    """The folder's code files (`code_files`) that are not byte-identical to this package's own."""
    differ = []
    for name in code_files(model_dir, config):
        shipped = RUNTIME_DIR / name
        if (
            name not in SHIPPED_CODE
            or not shipped.is_file()
            or (model_dir / name).read_bytes() != shipped.read_bytes()
        ):
            differ.append(name)
    return differ


def check_code(model_dir: Path, config: dict, allow_custom_code: bool = False) -> list[str]:
    """Refuse a folder whose code differs from the package's before anything runs it; returns what differs."""
    differ = custom_code(model_dir, config)
    if differ and not allow_custom_code:
        names = ", ".join(differ)
        raise DSGError(
            f"{model_dir}: its code ({names}) is not byte-identical to the code modeling_dsg "
            f"{_version()} ships; verifying would run it and the Hub would serve it to every user. "
            "Rebuild the folder with this version, or pass --allow-custom-code to publish it as it is"
        )
    return differ


def _version() -> str:
    from .. import __version__

    return __version__


def check_verify_timeout(seconds) -> float:
    import math

    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise DSGError(f"--verify-timeout must be a finite number of seconds > 0, got {seconds}")
    return float(seconds)


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    data = read_json_file(path, "tokenizer config") if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def weight_files(model_dir: Path) -> list[str]:
    """model.safetensors, or the index and every shard it lists; a missing shard is a `DSGError`."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        data = read_json_file(index, "weight index")
        shards = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
        if not shards:
            raise DSGError(f"{index} lists no weight files")
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise DSGError(f"{model_dir} is missing the weight shard {missing[0]} listed in {WEIGHTS_INDEX}")
        return [WEIGHTS_INDEX, *shards]
    if (model_dir / WEIGHTS).is_file():
        return [WEIGHTS]
    raise DSGError(f"{model_dir} has no weights ({WEIGHTS} or {WEIGHTS_INDEX} with shards)")


def source_files(model_dir: Path, config: dict) -> list[str]:
    """Every file of the model folder that is published, as paths relative to it (README excluded)."""
    tokenizer = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if not tokenizer:
        raise DSGError(f"{model_dir} has no tokenizer files (e.g. tokenizer.json, tokenizer_config.json)")
    extra_templates = sorted(
        f"additional_chat_templates/{p.name}" for p in (model_dir / "additional_chat_templates").glob("*.jinja")
    )
    files = [f for f in MODEL_FILES if (model_dir / f).is_file()]
    files += code_files(model_dir, config) + weight_files(model_dir) + tokenizer + extra_templates
    files += [f for f in DSG_FILES + LICENSE_FILES if (model_dir / f).is_file()]
    return files


def eval_files(eval_dir: Path | None) -> list[Path]:
    """report.json and the PNG plots of an eval folder (nothing if it does not exist)."""
    if eval_dir is None or not eval_dir.is_dir():
        return []
    files = sorted(eval_dir.glob("*.png"))
    if (eval_dir / "report.json").is_file():
        files.insert(0, eval_dir / "report.json")
    return files


# ------------------------------------------------------------------------------------------- stage
def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(src, dst)


def stage(model_dir, out_dir, repo_id: str, *, eval_dir=None, base_model=None, license=None) -> dict[str, int]:
    """Write the files to publish into the empty folder `out_dir`; return {relative path: size in bytes}."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = check_dsg_folder(model_dir)
    eval_dir = Path(eval_dir) if eval_dir is not None else model_dir / "eval"
    if eval_dir != model_dir / "eval" and not eval_dir.is_dir():
        raise DSGError(
            f"evaluation folder {eval_dir} " + ("is a file, not a folder" if eval_dir.exists() else "does not exist")
        )
    for rel in source_files(model_dir, config):
        _link_or_copy(model_dir / rel, out_dir / rel, link=rel.endswith(".safetensors"))
    for path in eval_files(eval_dir):
        _link_or_copy(path, out_dir / "eval" / path.name, link=False)
    card = render_card(model_dir, repo_id, eval_dir=eval_dir, base_model=base_model, license=license)
    card.save(out_dir / "README.md")
    return {p.relative_to(out_dir).as_posix(): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ verify
def _clean_env(modules_cache: str) -> dict:
    """The environment of the verification subprocess: offline, its own module cache, no path to this package."""
    env = dict(os.environ)
    paths = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and not (Path(p) / "modeling_dsg" / "__init__.py").is_file()
    ]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if not paths:
        env.pop("PYTHONPATH")
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=modules_cache,
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def verify(staged, timeout: float = VERIFY_TIMEOUT_S) -> dict:
    """Load `staged` through trust_remote_code in a clean subprocess; return what it reported.

    Raises `DSGError` with the subprocess's last error line if loading or the forward pass fails, and
    after `timeout` seconds.
    """
    staged = Path(staged).resolve()
    with tempfile.TemporaryDirectory(prefix="dsg-verify-") as work:
        cmd = [sys.executable, "-c", VERIFY_SCRIPT, str(staged)]
        try:
            proc = subprocess.run(
                cmd,
                cwd=work,
                env=_clean_env(str(Path(work) / "modules")),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise DSGError(
                f"verification did not finish within {timeout:g} s: loading {staged} with "
                f"trust_remote_code took too long (raise --verify-timeout)"
            ) from None
    if proc.returncode != 0:
        raise DSGError(f"the staged folder does not load with trust_remote_code: {_last_error_line(proc.stderr)}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DSGError(f"verification printed no result: {_last_error_line(proc.stdout + proc.stderr)}") from None


# ---------------------------------------------------------------------------------------------- hub
def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _bounded(fn, seconds: float, what: str):
    """Run `fn()` in a daemon thread; its result, its exception, or a `DSGError` after `seconds`."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DSGError(f"{what} did not answer within {seconds:g} s; nothing was uploaded")
    if "error" in box:
        raise box["error"]
    return box["value"]


def find_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the saved login; `DSGError` if there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise DSGError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    return token


def check_hub(api, token: str, repo_id: str, *, timeout: float = HUB_TIMEOUT_S) -> dict:
    """Fail within seconds, before anything is created, if the Hub cannot be reached or will refuse the upload.

    Returns the `whoami` answer. Checks: HF_HUB_OFFLINE is not set; a TCP connection to the endpoint
    opens within `timeout` s; `whoami` answers within `WHOAMI_TIMEOUT_S` s and accepts the token; the
    token is not read-only; OWNER is the token's user or one of its organizations.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DSGError("HF_HUB_OFFLINE is set: unset it to publish to the Hub (or use --dry-run)")
    endpoint = api.endpoint
    try:
        _bounded(lambda: connect(endpoint, timeout), timeout + 1.0, f"the Hub at {endpoint}")
    except OSError as err:
        raise DSGError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({err.strerror or err}); "
            f"check the network or HF_ENDPOINT. Nothing was uploaded"
        ) from None
    try:
        who = _bounded(lambda: api.whoami(token=token), WHOAMI_TIMEOUT_S, f"the Hub at {endpoint}")
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise DSGError(
                f"the Hub rejected the token (HTTP {status}): log in again with `hf auth login` or set "
                "HF_TOKEN to a token with write access"
            ) from None
        raise DSGError(f"the Hub at {endpoint} answered with an error: {err}") from None
    except DSGError:
        raise
    except Exception as err:  # network errors of every kind: one clear line
        raise DSGError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {err}). Nothing was uploaded"
        ) from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise DSGError("the token is read-only: create one with write access (https://huggingface.co/settings/tokens)")
    owner = repo_id.split("/")[0]
    namespaces = {who.get("name")} | {o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)}
    if who.get("name") and owner not in namespaces:
        raise DSGError(
            f"the token belongs to {who.get('name')!r}, who cannot create repos under {owner!r} "
            f"(their namespaces: {', '.join(sorted(n for n in namespaces if n))})"
        )
    return who


def upload(
    api,
    staged: Path,
    files: list[str],
    repo_id: str,
    *,
    token: str,
    private: bool,
    revision: str | None,
    commit_message: str,
) -> dict:
    """Create the repo if needed and add every staged file in one commit; return what happened."""
    from huggingface_hub import CommitOperationAdd

    try:
        existed = api.repo_exists(repo_id, repo_type="model", token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    except Exception as err:
        raise DSGError(f"cannot create the repo {repo_id}: {err}") from None
    try:
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staged / rel)) for rel in files]
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model", token=token
        )
    except Exception as err:
        note = ""
        if not existed:
            try:
                api.delete_repo(repo_id, repo_type="model", token=token, missing_ok=True)
                note = " (the repo it had just created was deleted again)"
            except Exception:
                note = f" (the empty repo {repo_id} it had just created could not be deleted)"
        raise DSGError(f"upload to {repo_id} failed: {err}{note}") from None
    return {"created_repo": not existed, "commit_url": getattr(info, "commit_url", None) or str(info)}


# --------------------------------------------------------------------------------------------- API
def publish(
    model_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run=None,
    token: str | None = None,
    api=None,
    overwrite: bool = False,
    eval_dir=None,
    base_model: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    verify_timeout: float = VERIFY_TIMEOUT_S,
    allow_custom_code: bool = False,
) -> dict:
    """Stage, verify and (unless `dry_run`) upload a DSG model folder. See the module docstring.

    Args:
        model_dir: the folder written by `dsg build`.
        repo_id: OWNER/NAME on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main when missing); default main.
        dry_run: a STAGING folder: stage and verify there, upload nothing. It must not exist or be
            empty, unless `overwrite`.
        token: a Hub token; default HF_TOKEN or the saved login.
        api: an `HfApi` to use (default one for HF_ENDPOINT).
        eval_dir: the `dsg eval` output folder (default `<model_dir>/eval`).
        base_model, license: the base model's Hub id and license, when the folder cannot tell.
        allow_custom_code: publish code files that differ from this package's (else a `DSGError`).

    Returns a dict: repo_id, private, revision, dry_run, staging (the STAGING path for a dry run, else
    None), files ({path: bytes}), total_bytes, verified (the subprocess's report), and for an upload
    created_repo and commit_url.
    """
    from huggingface_hub import HfApi

    model_dir = Path(model_dir).expanduser()
    config = check_dsg_folder(model_dir)
    repo_id = check_repo_id(repo_id)
    verify_timeout = check_verify_timeout(verify_timeout)
    custom = check_code(model_dir, config, allow_custom_code)
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or " " in revision):
        raise DSGError(f"bad revision {revision!r}: expected a branch name")
    result = {"repo_id": repo_id, "private": bool(private), "revision": revision, "dry_run": dry_run is not None}

    if dry_run is not None:
        staging = prepare_output(
            dry_run,
            overwrite,
            flag="--dry-run",
            kind="staging folder",
            empty_ok=True,
            inputs={"the model folder": model_dir, "the --eval folder": eval_dir},
        )
        with atomic_output_dir(staging, overwrite=True) as tmp:
            files = stage(model_dir, tmp, repo_id, eval_dir=eval_dir, base_model=base_model, license=license)
            verified = verify(tmp, verify_timeout)
        return {
            **result,
            "staging": str(staging),
            "files": files,
            "total_bytes": sum(files.values()),
            "verified": verified,
            "custom_code": custom,
        }

    token = find_token(token)
    api = api if api is not None else HfApi(endpoint=_endpoint())
    check_hub(api, token, repo_id)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{model_dir.resolve().name}.publish-", dir=model_dir.resolve().parent))
    except OSError:  # the model's parent folder is read-only: stage in the system temp folder
        work = Path(tempfile.mkdtemp(prefix="dsg-publish-"))
    try:
        staged = work / model_dir.resolve().name
        staged.mkdir()
        files = stage(model_dir, staged, repo_id, eval_dir=eval_dir, base_model=base_model, license=license)
        verified = verify(staged, verify_timeout)
        topics = ", ".join(g.get("name", "?") for g in check_dsg_folder(model_dir).get("guardrails") or [])
        message = commit_message or f"Upload DSG model ({topics or 'no guardrails'}) with dsg publish"
        uploaded = upload(
            api, staged, list(files), repo_id, token=token, private=private, revision=revision, commit_message=message
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        **result,
        "staging": None,
        "files": files,
        "total_bytes": sum(files.values()),
        "verified": verified,
        "custom_code": custom,
        **uploaded,
    }


# --------------------------------------------------------------------------------------------- CLI
def human_size(n: int) -> str:
    """Bytes as B / KB / MB / GB (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def format_listing(result: dict) -> str:
    """The staged files with their sizes, and the total, one per line."""
    lines = [f"{human_size(size):>10}  {path}" for path, size in result["files"].items()]
    lines.append(f"{human_size(result['total_bytes']):>10}  total, {len(result['files'])} files")
    return "\n".join(lines)


def configure_parser(parser) -> None:
    parser.add_argument("model_dir", metavar="DIR", help="the DSG model folder written by `dsg build`")
    parser.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the Hub model repo to publish to")
    parser.add_argument("--private", action="store_true", help="create the repo private (default public)")
    parser.add_argument(
        "--revision", metavar="BRANCH", help="commit to this branch (created if missing; default main)"
    )
    parser.add_argument(
        "--dry-run", metavar="STAGING", help="stage and verify into STAGING, print the files, upload nothing"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty STAGING folder")
    parser.add_argument("--token", help="Hub token (default: $HF_TOKEN or the saved `hf auth login`)")
    parser.add_argument(
        "--eval",
        dest="eval_dir",
        metavar="EVAL_DIR",
        help="the `dsg eval` output folder with report.json and plots (default DIR/eval)",
    )
    parser.add_argument(
        "--base-model", metavar="HUB_ID", help="the base model's Hub id, if DIR only records a local path"
    )
    parser.add_argument(
        "--license", metavar="ID", help="license id for the card (default: the base model's, where known)"
    )
    parser.add_argument("--commit-message", metavar="MSG", help="the commit message")
    parser.add_argument(
        "--verify-timeout",
        type=float,
        default=VERIFY_TIMEOUT_S,
        metavar="S",
        help=f"seconds allowed for the load check (default {VERIFY_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--allow-custom-code",
        action="store_true",
        help="publish (and run, to verify) code files that differ from the ones this package ships",
    )


def run(args) -> int:
    result = publish(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        token=args.token,
        overwrite=args.overwrite,
        eval_dir=args.eval_dir,
        base_model=args.base_model,
        license=args.license,
        commit_message=args.commit_message,
        verify_timeout=args.verify_timeout,
        allow_custom_code=args.allow_custom_code,
    )
    if result["custom_code"]:
        print(
            f"note: published code that differs from modeling_dsg's own: {', '.join(result['custom_code'])} "
            "(--allow-custom-code)"
        )
    v = result["verified"]
    print(
        f"verified: {v.get('class')} loads with trust_remote_code in a clean process "
        f"({v.get('seconds')} s, logits {v.get('logits_shape')})"
    )
    if result["dry_run"]:
        print(f"dry run: staged in {result['staging']}, nothing uploaded to {result['repo_id']}")
    print(format_listing(result))
    if not result["dry_run"]:
        visibility = "private" if result["private"] else "public"
        made = f"created {visibility} repo" if result["created_repo"] else "existing repo"
        print(
            f"uploaded {len(result['files'])} files in one commit to {made} {result['repo_id']}: "
            f"{result['commit_url']}"
        )
    return 0
