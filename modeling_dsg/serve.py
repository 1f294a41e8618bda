"""`dsg serve DIR`: an OpenAI-compatible server for a DSG model folder, on transformers' own serving stack.

`transformers serve DIR --trust-remote-code` cannot load a DSG folder (transformers 5.20 to 5.24): its
`ModelManager._load_model` resolves the model class with `getattr(transformers, config.architectures[0])`,
and `DSGForCausalLM` is remote code, not a transformers class. This module changes that one piece and
nothing else: `DSGModelManager._load_model` loads the folder with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (the folder's own code, as any user of
the published model runs it). The application, its routes (`/v1/chat/completions`, `/v1/completions`,
`/v1/responses`, `/v1/models`, `/health`), the OpenAI request/response schema, streaming (SSE) and the
generation thread are transformers' (`transformers.cli.serving`): `build_server` and its handlers, wired as
`transformers serve` wires them.

Requests run through `model.generate`, one at a time on the model's inference thread (transformers'
`GenerateManager`), so each request is its own batch row and the guardrails decide per request. Continuous
batching packs requests into one row and is refused (`--continuous-batching` ends in one error).

What is relied on in `transformers.cli.serving` is checked by `serving_api_problems()` before the server
starts (and by tests/test_serve.py); a release that moved it is one `dsg: error:` line naming what moved.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from .errors import DSGError

# the transformers releases whose serving internals this module was checked against (pyproject.toml's range)
TESTED_TRANSFORMERS = ">=5.20,<5.25"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
CONTINUOUS_BATCHING_REFUSED = (
    "--continuous-batching is not supported by DSG models: continuous batching packs several requests into one "
    "row of one forward call, and the guardrails decide per row, so one request's text would switch the guard on "
    "or off for another. Serve without it (`dsg serve DIR`): each request then runs through generate() as its own "
    "row, one at a time, with its own guardrail decision."
)
# the parameters of ModelManager._load_model that load_model_and_processor passes (5.20 to 5.24)
LOAD_MODEL_PARAMETERS = ("self", "model_id_and_revision", "tqdm_class", "progress_callback", "gguf_file")


def _serving():
    """transformers' serving modules, or a DSGError saying what to install."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise DSGError(
            "dsg serve needs transformers' serving dependencies (fastapi, uvicorn, pydantic, openai): "
            "pip install 'modeling_dsg[serve]'"
        )
    try:
        from transformers.cli.serving import (
            chat_completion,
            completion,
            model_manager,
            response,
            server,
            systemone,
            transcription,
            utils,
        )
    except ImportError as err:
        raise DSGError(
            f"cannot import transformers' serving stack (transformers.cli.serving): {err}; dsg serve is "
            f"tested with transformers{TESTED_TRANSFORMERS}"
        ) from None
    return dict(
        chat_completion=chat_completion,
        completion=completion,
        model_manager=model_manager,
        response=response,
        server=server,
        utils=utils,
        systemone=systemone,
        transcription=transcription,
    )


def _split_revision(name: str) -> tuple[str, str | None]:
    """`DIR` -> (DIR, None); `DIR@main` (how transformers 5.20 names a local folder) -> (DIR, 'main')."""
    if os.path.exists(name) or "@" not in name:
        return name, None
    model_id, _, revision = name.rpartition("@")
    return model_id, revision or None


def dsg_model_manager_class():
    """`DSGModelManager`: transformers' `ModelManager` with `_load_model` loading through the Auto classes."""
    ModelManager = _serving()["model_manager"].ModelManager

    class DSGModelManager(ModelManager):
        """transformers' `ModelManager`, except that the model is loaded with
        `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` instead of
        `getattr(transformers, config.architectures[0]).from_pretrained(...)`, which has no remote code."""

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            from transformers import AutoModelForCausalLM

            if gguf_file is not None:
                raise ValueError("dsg serve serves a DSG folder, not a GGUF file")
            model_id, revision = _split_revision(model_id_and_revision)
            kwargs = {
                "revision": revision,
                "dtype": self.dtype,
                "device_map": self.device,
                "attn_implementation": self.attn_implementation,
                "trust_remote_code": True,
            }
            if tqdm_class is not None:
                kwargs["tqdm_class"] = tqdm_class
            if progress_callback is not None:
                progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "model"})
            model = AutoModelForCausalLM.from_pretrained(
                model_id, **{k: v for k, v in kwargs.items() if v is not None}
            )
            if getattr(model.config, "model_type", None) != "dsg":
                raise ValueError(f"{model_id} is not a DSG model (model_type {model.config.model_type!r})")
            return model.eval()

        def get_gen_models(self, cache_dir=None):
            """`/v1/models` where it calls `ModelManager.get_gen_models()` (transformers 5.20; 5.24 calls
            `list_models`, which lists a pinned model itself): the served folder, not a scan of the Hub cache
            (which fails where there is none)."""
            return [{"id": self.force_model, "object": "model", "created": 0, "owned_by": "local"}]

    return DSGModelManager


def _bind(fn, *args, **kwargs) -> str | None:
    """None if `fn(*args, **kwargs)` matches fn's signature; else what does not."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        return f"{getattr(fn, '__qualname__', fn)}: {err}"
    return None


def _source(fn) -> str | None:
    """fn's source text; None where it is not available (an install without .py files)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


def _wiring(serving: dict, manager, generation_state, enable_cors: bool = False) -> tuple[dict, tuple]:
    """({handler name: (class, args, kwargs)}, (build_server, args, kwargs without the handlers)): the calls
    `transformers.cli.serve.Serve` makes to build its application (no chat-template kwargs, no decision config).
    Written once, so `serving_api_problems` checks exactly the calls `build_app` makes."""
    handlers = {
        "chat_handler": (
            serving["chat_completion"].ChatCompletionHandler,
            (),
            dict(model_manager=manager, generation_state=generation_state, chat_template_kwargs={}),
        ),
        "completion_handler": (
            serving["completion"].CompletionHandler,
            (),
            dict(model_manager=manager, generation_state=generation_state),
        ),
        "response_handler": (
            serving["response"].ResponseHandler,
            (),
            dict(model_manager=manager, generation_state=generation_state, chat_template_kwargs={}),
        ),
        "transcription_handler": (serving["transcription"].TranscriptionHandler, (manager, generation_state), {}),
        "systemone_handler": (
            serving["systemone"].SystemOneHandler,
            (),
            dict(
                model_manager=manager, generation_state=generation_state, chat_template_kwargs={}, decision_config=None
            ),
        ),
    }
    return handlers, (
        serving["server"].build_server,
        (manager,),
        dict(generation_state=generation_state, enable_cors=enable_cors),
    )


def serving_api_problems() -> list[str]:
    """What `dsg serve` relies on in `transformers.cli.serving` and this transformers lacks (empty: all there).

    - `ModelManager._load_model(self, model_id_and_revision, tqdm_class, progress_callback, gguf_file)` exists,
      is what `load_model_and_processor` calls, and reads `self.dtype`, `self.device`, `self.attn_implementation`,
      which `ModelManager.__init__` sets;
    - `ModelManager(device=, dtype=, trust_remote_code=, attn_implementation=, model_timeout=, force_model=)`;
    - `GenerationState(continuous_batching=, compile=, cb_config=)`;
    - the five handlers and `build_server(...)` take what `transformers serve` passes them.
    """
    serving = _serving()
    ModelManager = serving["model_manager"].ModelManager
    problems = []
    base = getattr(ModelManager, "_load_model", None)
    if base is None:
        problems.append("ModelManager._load_model is gone")
    else:
        found = tuple(inspect.signature(base).parameters)
        if found != LOAD_MODEL_PARAMETERS:
            problems.append(f"ModelManager._load_model takes {found}, not {LOAD_MODEL_PARAMETERS}")
    caller, init = _source(ModelManager.load_model_and_processor), _source(ModelManager.__init__)
    if caller is not None and "self._load_model(" not in caller:
        problems.append("ModelManager.load_model_and_processor no longer calls self._load_model(...)")
    for attribute in ("self.dtype", "self.device", "self.attn_implementation", "self.force_model"):
        if init is not None and f"{attribute} =" not in init:
            problems.append(f"ModelManager.__init__ no longer sets {attribute}")
    problems += filter(
        None,
        [
            _bind(ModelManager.__init__, None, **_manager_kwargs("DIR", "cpu", "auto", preload=False)),
            _bind(serving["utils"].GenerationState, **_generation_state_kwargs()),
        ],
    )
    handlers, (build, args, kwargs) = _wiring(serving, None, None)
    for fn, handler_args, handler_kwargs in handlers.values():
        problems += filter(None, [_bind(fn, *handler_args, **handler_kwargs)])
    problems += filter(None, [_bind(build, *args, **kwargs, **{name: None for name in handlers})])
    return problems


def check_serving_api() -> None:
    problems = serving_api_problems()
    if problems:
        import transformers

        raise DSGError(
            f"transformers {transformers.__version__}'s serving internals moved ({'; '.join(problems)}); "
            f"dsg serve is tested with transformers{TESTED_TRANSFORMERS}"
        )


def _manager_kwargs(folder: str, device: str, dtype: str, preload: bool = True) -> dict:
    return dict(
        device=device,
        dtype=dtype,
        trust_remote_code=True,
        attn_implementation=None,
        model_timeout=-1,
        force_model=folder if preload else None,
    )


def _generation_state_kwargs() -> dict:
    return dict(continuous_batching=False, compile=False, cb_config=None)


def check_folder(folder) -> Path:
    """A DSG model folder with a tokenizer and readable weights; else a DSGError."""
    from .data.sources import check_dsg_folder, check_tokenizer_files, check_weight_files

    path = Path(folder).expanduser()
    config = check_dsg_folder(path)
    guardrails = config.get("guardrails", [])
    if not isinstance(guardrails, list) or not all(isinstance(g, dict) for g in guardrails):
        raise DSGError(f"{path}/config.json: 'guardrails' must be a list of guardrail objects")
    what = f"the DSG model in {path}"
    check_tokenizer_files(path, what)
    check_weight_files(path, what)
    return path


def build_app(folder, *, device: str = "cpu", dtype: str = "auto", enable_cors: bool = False):
    """(FastAPI app, model manager) serving the DSG folder `folder` with transformers' serving application.

    The model is loaded here (before the server answers); requests must name it as `folder` was given (or
    leave `model` out). A bad folder or a failed load is a `DSGError`."""
    from .data.sources import LOAD_ERRORS, one_line, quiet_transformers

    folder = str(folder)
    check_folder(folder)
    if dtype not in DTYPES:
        raise DSGError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_serving_api()
    serving = _serving()
    manager_class = dsg_model_manager_class()
    try:
        with quiet_transformers():
            manager = manager_class(**_manager_kwargs(folder, device, dtype))
    except LOAD_ERRORS as err:
        raise DSGError(f"cannot load the DSG model in {folder}: {one_line(err)}") from None
    generation_state = serving["utils"].GenerationState(**_generation_state_kwargs())
    handlers, (build, args, kwargs) = _wiring(serving, manager, generation_state, enable_cors)
    built = {
        name: fn(*handler_args, **handler_kwargs) for name, (fn, handler_args, handler_kwargs) in handlers.items()
    }
    app = build(*args, **kwargs, **built)
    app.state.dsg_generation_state = generation_state  # stopped with the app (see serve())
    return app, manager


def loaded_model(manager):
    """The DSG model and tokenizer the manager holds for its pinned folder."""
    model_id = manager.process_model_name(manager.force_model)
    return manager.load_model_and_processor(model_id)


def configure_parser(p):
    p.add_argument("dir", metavar="DIR", help="a DSG model folder (written by `dsg build` or `save_pretrained`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--device", default="cpu", help="torch device for the model: cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (default: the checkpoint's)")
    p.add_argument("--enable-cors", action="store_true", help="allow cross-origin requests from any origin")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=LOG_LEVELS,
        help="transformers' log level; 'info' logs each guardrail decision (rho, tau, fired, at which token)",
    )
    p.add_argument(
        "--continuous-batching",
        action="store_true",
        help="refused: DSG guardrails decide per row, and continuous batching packs requests into one row",
    )


def run(args):
    if args.continuous_batching:
        raise DSGError(CONTINUOUS_BATCHING_REFUSED)
    check_folder(args.dir)  # a bad folder is reported first, then an address in use, before the model loads
    check_port(args.host, args.port)
    app, manager = build_app(args.dir, device=args.device, dtype=args.dtype, enable_cors=args.enable_cors)
    model, tokenizer = loaded_model(manager)
    if not getattr(tokenizer, "chat_template", None):
        print(
            f"dsg serve: warning: the tokenizer in {args.dir} has no chat template, so /v1/chat/completions "
            "cannot format a chat; /v1/completions (plain prompts) works"
        )
    guards = ", ".join(_describe(guard) for guard in getattr(model, "guards", []))
    print(f"dsg serve: {args.dir} on {model.device}, guardrails: {guards or 'none'}")
    print(f"dsg serve: OpenAI-compatible API at http://{args.host}:{args.port}/v1 (model name: {args.dir!r})")
    serve(app, host=args.host, port=args.port, log_level=args.log_level)


def _describe(guard) -> str:
    """'name' (layer L, tau T, action): read defensively, since an older folder's own code may lack a field."""
    parts = [
        f"layer {guard.layer}" if hasattr(guard, "layer") else None,
        f"tau {float(guard.threshold):.4f}" if hasattr(guard, "threshold") else None,
        getattr(guard, "action", None),
    ]
    return f"{getattr(guard, 'name', '?')!r} ({', '.join(p for p in parts if p)})"


def check_port(host: str, port: int) -> None:
    """The address can be listened on (checked before the model loads); else a DSGError."""
    import socket

    if not 0 <= port <= 65535:
        raise DSGError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise DSGError(f"--host {host!r} is not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise DSGError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from None


def serve(app, *, host: str, port: int, log_level: str = "warning") -> None:
    """Run `app` with uvicorn until interrupted (transformers' log level set to `log_level`)."""
    import uvicorn
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").setLevel(hf_logging.log_levels[log_level])
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.dsg_generation_state.shutdown()
