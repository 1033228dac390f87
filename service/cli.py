"""`dense-serve` command line: parse, then call. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, get_args

from models.errors import ModelError
from models.outputs import FAMILIES, TASKS, PredictionMap
from models.probes.cli import add_probe_parser
from models.spec import BACKEND_CHOICES
from models.training.cli import add_eval_parser, add_finetune_parser
from service import logs, tracing
from service.errors import InvalidParameter
from service.request import (
    AnswerUncertainty,
    Format,
    Limits,
    PredictionRequest,
    check_for_model,
    parse_request,
)

if TYPE_CHECKING:
    from models.inference import DensePredictor
    from models.probes.depth_probe import DepthProbe
    from models.spec import ModelSpec
    from service.config import Settings
    from service.defaults import DefaultModel
    from service.keys import Role

#: The answer formats a file can hold (`json`, `raw16` and `raw32` are wire-only); one spelling, as in REST and gRPC.
FILE_FORMATS: tuple[Format, ...] = ("png", "npy", "color", "exr", "tiff")
FILE_NAMES: dict[Format, str] = {
    "png": "{}.png",
    "npy": "{}.npy",
    "color": "{}_color.png",
    "exr": "{}.exr",
    "tiff": "{}.tiff",
}


def _quiet_hub_libraries() -> None:
    """Library progress bars for tiny local files only clutter the CLI's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _formats(value: str) -> list[Format]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in FILE_FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"formats must be a comma list of {', '.join(FILE_FORMATS)}; got {value!r}")
    return [f for f in FILE_FORMATS if f in items]


def _int_list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from exc
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def _config_and_queue(p: argparse.ArgumentParser, embedded: bool) -> None:
    p.add_argument(
        "--config", type=Path, metavar="FILE", help="settings file (.toml or .yaml); DENSE_* variables override it"
    )
    if embedded:
        p.add_argument(
            "--queue",
            choices=("memory", "redis"),
            help="memory: jobs stay in this process (default); redis: Redis Streams",
        )
    else:
        p.add_argument("--queue", choices=("redis",), default="redis", help="the queue (Redis Streams)")
    p.add_argument("--redis-url", metavar="URL", help="Redis URL (default redis://127.0.0.1:6379/0)")


def _models(p: argparse.ArgumentParser, metavar: str, text: str) -> None:
    p.add_argument("--model", action="append", dest="models", metavar=metavar, help=text)


#: `--probe` on processes that load probes (serve, worker) and on front-ends that only declare them (api, grpc).
PROBE_HELP = {
    "load": "a trained probe folder (dense-serve probe train), served beside its base model: /v1/segment, or "
    "/v1/depth?model=ID for a depth probe",
    "declare": "a trained probe folder whose requests this front-end accepts (workers serve it with worker "
    "--probe); with scale_from_zero they wait for a worker to start",
}


def _probes(p: argparse.ArgumentParser, role: str = "load") -> None:
    p.add_argument("--probe", action="append", dest="probes", metavar="DIR", help=PROBE_HELP[role])


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        help="runtime for every model (default: the spec's; auto = PyTorch for checkpoints); onnxruntime and "
        "tensorrt export each checkpoint on first start (kept in .cache/engines)",
    )


def _bind(p: argparse.ArgumentParser, host_dest: str, port_dest: str, default_port: int) -> None:
    p.add_argument("--host", dest=host_dest, metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        dest=port_dest,
        help=f"port (default {default_port}; 0: any free one; a taken one is refused)",
    )
    if port_dest == "grpc_port":  # `dense-serve grpc`: --grpc-port is --port, the spelling serve and api use
        p.add_argument("--grpc-port", type=int, dest=port_dest, help=argparse.SUPPRESS)
    else:
        p.add_argument(
            "--grpc-port",
            type=int,
            metavar="PORT",
            help="gRPC port (default 50051; 0: any free one; a taken one is refused)",
        )


def _api_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY", help="require this key (repeatable)")
    p.add_argument(
        "--api-keys-dir",
        type=Path,
        metavar="DIR",
        help="also accept the key in each file of DIR (a mounted Secret); re-read as it changes, no restart needed",
    )
    p.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const="off",
        help="serve without API keys, on purpose (DENSE_AUTH=off); without keys `api`, `grpc` and a `serve` "
        "reachable from other machines refuse to start",
    )


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one spelling of a refusal: the usage, then `error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dense-serve",
        description="Depth, normals and their uncertainty from diffusion models (Lotus, E2E-FT, Marigold): serve "
        "them over REST and gRPC, or write maps of image files.",
        epilog="First steps: `dense-serve serve` (then open http://127.0.0.1:8000/), `dense-serve predict "
        "photo.jpg` (maps into ./out), `dense-serve models`. `dense-serve COMMAND --help` for each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "predict",
        help="write depth or normals maps of image files (no server needed)",
        description="Write the depth (or normals) map of each image file into --out. Without --model: the model "
        "`serve` answers /v1/depth (or /v1/normals with --task normals) with when none is configured.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    p.add_argument(
        "--model",
        help="a model id from `dense-serve models` (the demo's: lotus-d-synthetic-demo), a spec .toml, a diffusers "
        "folder or a hub id (default: the task's default model, as `serve` serves it)",
    )
    p.add_argument("--task", choices=TASKS, help="depth or normals (default: the model's; depth without --model)")
    p.add_argument(
        "--probe",
        type=Path,
        metavar="DIR",
        help="a trained depth probe folder: write its depth map (as /v1/depth?model=PROBE does), computed on "
        "--model, the model it was trained on",
    )
    p.add_argument("--probe-head", choices=("strong", "weak"), help="the depth probe's head (default: its serve_head)")
    p.add_argument(
        "--processing-res",
        metavar="PX",
        type=int,
        help="long edge the model sees, a multiple of 8; 0 = native (default: model's)",
    )
    p.add_argument(
        "--match-input-resolution",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="resize maps back to the input size (default); --no-match-input-resolution keeps the processing size",
    )
    p.add_argument("--seed", metavar="N", type=int, help="Lotus-G / Marigold noise seed (default: the spec's, 0)")
    p.add_argument(
        "--steps",
        metavar="N",
        type=int,
        help="denoising steps (default: the model's; single-step families refuse other than 1)",
    )
    p.add_argument(
        "--ensemble-size", metavar="N", type=int, help="Marigold: members ensembled as diffusers does (default 1)"
    )
    p.add_argument(
        "--uncertainty",
        choices=get_args(AnswerUncertainty),
        help="steps: also write the step-change uncertainty of each run (Marigold, steps >= 2) as "
        "STEM_KIND_uncertainty.EXT in each format (default none)",
    )
    p.add_argument("--batch-size", metavar="N", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument(
        "--format",
        metavar="LIST",
        type=_formats,
        default=["png"],
        help=f"comma list of {','.join(FILE_FORMATS)} (default png)",
    )
    p.add_argument("--out", metavar="DIR", type=Path, default=Path("out"), help="output directory (default ./out)")
    p.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N (default: the spec's, auto)")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--max-pixels", metavar="N", type=int, default=None, help="refuse larger images (default 40 MP)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, help="runtime (default: the spec's; auto = torch)")
    p.add_argument(
        "--io-threads",
        type=int,
        metavar="N",
        help="threads that read and write files while the model runs (default: cores)",
    )
    p.add_argument(
        "--png-compression",
        type=int,
        choices=range(10),
        default=1,
        metavar="0-9",
        help="PNG level: 0-3 fast, 4-9 smaller files (default 1)",
    )
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false", help="always decode JPEGs at full size")
    p.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "serve",
        help="serve the REST API, the demo page and gRPC, computing in this process",
        description="Serve the REST API (http://127.0.0.1:8000, demo page at /, API docs at /docs) and gRPC "
        "(127.0.0.1:50051), computing the maps in this process. Without --model: the models `dense-serve models` "
        "lists as served by default (a small trained demo; random-weight stand-ins where no demo exists).",
    )
    _config_and_queue(s, embedded=True)
    _models(
        s,
        "MODEL",
        "model to serve (repeatable): a shipped id, a hub id, a diffusers folder or a spec .toml (default: "
        "the default models)",
    )
    _probes(s)
    _backend(s)
    _bind(s, "host", "port", 8000)
    _api_keys(s)
    s.set_defaults(func=cmd_serve, role="serve")

    a = sub.add_parser(
        "api",
        help="serve the REST API and gRPC only; `worker` processes compute, through Redis",
        description="Serve the REST API, the demo page and gRPC without computing: jobs go to Redis, where "
        "`dense-serve worker` processes (any number, on any machine) take them.",
    )
    _config_and_queue(a, embedded=False)
    _models(
        a,
        "ID",
        "a model id the workers serve (repeatable): /readyz waits for each (default: ready once any "
        "worker serves a model)",
    )
    _probes(a, "declare")
    _bind(a, "host", "port", 8000)
    _api_keys(a)
    a.set_defaults(func=cmd_serve, role="api")

    g = sub.add_parser(
        "grpc",
        help="serve gRPC only; `worker` processes compute, through Redis",
        description="Serve only the gRPC API (Predict, StreamPredict, ListModels; port 50051): jobs go to Redis, "
        "where `dense-serve worker` processes take them.",
    )
    _config_and_queue(g, embedded=False)
    _models(g, "ID", "a model id the workers serve (repeatable): the health service waits for each")
    _probes(g, "declare")
    _bind(g, "grpc_host", "grpc_port", 50051)
    _api_keys(g)
    g.add_argument("--metrics-port", type=int, metavar="PORT", help="serve /metrics, /healthz and /readyz on this port")
    g.set_defaults(func=cmd_grpc)

    w = sub.add_parser(
        "worker",
        help="compute for `api` and `grpc` front-ends: take jobs from Redis",
        description="Load the models and compute the jobs that `api` and `grpc` front-ends put in Redis. Without "
        "--model: the default models (dense-serve models).",
    )
    _config_and_queue(w, embedded=False)
    _models(w, "MODEL", "model to serve (repeatable): a shipped id, a hub id, a diffusers folder or a spec .toml")
    _probes(w)
    _backend(w)
    w.add_argument(
        "--name", dest="worker_name", help="this worker's name in Redis (default host-pid); keep it across restarts"
    )
    w.add_argument("--metrics-port", type=int, metavar="PORT", help="serve /metrics, /healthz and /readyz on this port")
    w.add_argument("--host", metavar="ADDR", help="address of the metrics port (default 127.0.0.1)")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser(
        "bench",
        help="time a model at fixed resolutions and batch sizes",
        description="Time a model on random images at each resolution and batch size: a Markdown table of "
        "ms per image and the speed-up over batch 1.",
    )
    b.add_argument(
        "--model", required=True, help="a model id (dense-serve models), a spec .toml, a diffusers folder or a hub id"
    )
    b.add_argument("--resolutions", type=_int_list, default=[64, 128], help="comma list (default 64,128)")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="comma list (default 1,8)")
    b.add_argument("--images", type=int, default=16, help="images per measurement (default 16)")
    b.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    b.add_argument("--backend", choices=BACKEND_CHOICES, help="runtime (default: the spec's)")
    b.add_argument("--task", choices=TASKS, help="override the detected task")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser(
        "export",
        help="export a model to ONNX, TensorRT engines or a Triton repository",
        description="Export a model's graphs to a folder that `serve --model FOLDER` serves with ONNX Runtime, "
        "TensorRT or Triton, and report its largest difference from PyTorch's maps.",
    )
    x.add_argument("--model", required=True, help="spec .toml, local diffusers folder, shipped spec id or hub id")
    x.add_argument("--task", choices=TASKS, help="override the detected task")
    x.add_argument(
        "--format",
        choices=("onnx", "tensorrt", "triton"),
        default="onnx",
        help="onnx (ONNX Runtime), tensorrt (engines for this GPU) or triton (a model repository); default onnx",
    )
    x.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    x.add_argument("--out", type=Path, required=True, help="output folder (replaced if it exists)")
    x.add_argument("--max-batch", type=int, default=16, help="largest batch the graphs/engines take (default 16)")
    x.add_argument("--resolutions", type=_int_list, help="resolution buckets (default: the model's processing res)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--device", default="auto", help="where the export is verified: auto, cpu, cuda:N")
    x.add_argument("--triton-instance-kind", choices=("gpu", "cpu"), default="gpu", help="Triton instance group")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser(
        "models",
        help="list the models served by default and the shipped model specs",
        description="List the models `serve` serves and `predict` uses when no model is given (which are trained, "
        "which are random weights, which endpoint each is the default of), then the shipped specs of published "
        "checkpoints (serve --model ID).",
    )
    m.set_defaults(func=cmd_models)

    add_finetune_parser(sub)
    add_eval_parser(sub)
    add_probe_parser(sub)

    sg = sub.add_parser(
        "segment",
        help="class maps of image files from a trained probe (as POST /v1/segment)",
        description="Write the class map of each image file from a trained segmentation probe (dense-serve probe "
        "train) on its base model: what POST /v1/segment answers, as files.",
    )
    sg.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...)")
    sg.add_argument("--probe", type=Path, required=True, help="a trained probe folder")
    sg.add_argument("--model", help="its base model (default: the checkpoint it was trained on)")
    sg.add_argument("--processing-res", type=int, help="default: the probe's")
    sg.add_argument(
        "--format", default="png", help="comma list of png (8-bit index), npy, color (overlay), json (default png)"
    )
    sg.add_argument("--with-depth", action="store_true", help="also the base model's map from the same pass")
    sg.add_argument("--out", type=Path, required=True, help="output directory")
    sg.set_defaults(func=cmd_segment)

    t = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight checkpoint for tests and trials",
        description="Write a tiny checkpoint with random weights (a few MB): it runs like a real model of its "
        "family, but its maps are noise.",
    )
    t.add_argument("out", type=Path, metavar="DIR", help="the checkpoint folder to write (replaced if it exists)")
    t.add_argument("--family", choices=FAMILIES, required=True, help="which model family it imitates")
    t.add_argument("--task", choices=TASKS, required=True, help="what it predicts")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="seed of its random weights (default 0)")
    t.add_argument(
        "--scheduler", choices=("ddim", "lcm"), default="ddim", help="marigold: DDIM (v1-1, 4 steps) or LCM (1 step)"
    )
    t.set_defaults(func=cmd_make_tiny)
    return parser


def _model_spec(model: str | None, task: str | None = None) -> ModelSpec:
    """`--model` as the server knows it: none is the task's default model (depth unless `task`), an id of a
    default model (`dense-serve models`) is that model, built on first use if it is a random tiny one; an
    existing path, a shipped id or a hub id resolve as everywhere else."""
    from models.errors import SpecError
    from models.spec import resolve_spec
    from service.defaults import build_tiny, default_for, default_models

    if model is not None and Path(model).exists():
        return resolve_spec(model, task=task)
    defaults = default_models(_settings_or_defaults().tiny_dir)
    if model is None:
        chosen = default_for(defaults, task or "depth")  # type: ignore[arg-type]
        if chosen is None:
            raise SpecError(f"no default model predicts {task}; give --model (dense-serve models lists them)")
        return build_tiny(chosen)
    chosen = next((m for m in defaults if m.spec.id == model), None)
    if chosen is None:
        return resolve_spec(model, task=task)
    spec = build_tiny(chosen)
    if task is not None and task != chosen.task:
        raise SpecError(f"model '{model}' predicts {chosen.task}, not {task}")
    return spec


def _settings_or_defaults() -> Settings:
    """The environment's settings (DENSE_TINY_DIR, ...) for commands that take no --config."""
    from service.config import load_settings

    return load_settings()


def _load(
    model: str | None, device: str | None, dtype: str | None, task: str | None = None, backend: str | None = None
) -> DensePredictor:
    from models.loading import load_model

    return load_model(_model_spec(model, task), device=device, dtype=dtype, backend=backend)


def cmd_bench(args: argparse.Namespace) -> int:
    _quiet_hub_libraries()
    import torch

    from models.benchmark import bench_predictor, format_table

    try:
        model = _load(args.model, args.device, args.dtype, args.task, args.backend)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rt = model.runtime
    where = f"{rt.name} {rt.device.type} {str(rt.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads"
    rows = bench_predictor(model, args.resolutions, args.batch_sizes, args.images)
    print(format_table(rows, f"{model.model_id} ({model.family} {model.output_kind}) on {where}"))
    return 0


SERVING_KEYS = (
    "host",
    "port",
    "grpc_port",
    "models",
    "probes",
    "api_keys",
    "api_keys_dir",
    "auth",
    "queue",
    "redis_url",
    "worker_name",
    "backend",
    "metrics_port",
)


def _settings(args: argparse.Namespace, keys: Sequence[str] = SERVING_KEYS) -> Settings:
    """Settings from file < env < the flags among `keys` (cheap: no model library is imported)."""
    from service.config import load_settings

    return load_settings(args.config, **{k: getattr(args, k, None) for k in keys})


def _serving_setup(
    args: argparse.Namespace, settings: Settings | None = None
) -> tuple[Settings, list[ModelSpec], list[DefaultModel]]:
    """Settings from file/env/flags, the specs to serve (the defaults when none), checked before starting."""
    from service.processes import preflight, preflight_probes, preflight_queue, serving_specs
    from service.worker.encode import EncodeOptions

    settings = settings or _settings(args)
    EncodeOptions(settings.png_compression, settings.tiff_compression).check()
    specs, defaults = serving_specs(settings)
    preflight(specs)
    preflight_probes(settings.probes, specs)
    preflight_queue(settings)
    return settings, specs, defaults


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.ports import PortTaken
    from service.processes import default_banner, frontend_probes, frontend_specs, preflight_queue

    api_only = args.role == "api"
    try:
        if api_only:
            keys = ("host", "port", "grpc_port", "api_keys", "api_keys_dir", "auth", "queue", "redis_url", "probes")
            settings = _settings(args, keys)
            # The API reads no checkpoint: ids to wait for, and specs to accept jobs by before workers come.
            specs, defaults = frontend_specs(args.models or settings.models), []
            frontend_probes(settings.probes, specs)
            _check_auth(settings, "api")
            _check_ports(settings)
            preflight_queue(settings)
        else:
            settings = _settings(args)
            _check_auth(settings, "serve")
            _check_ports(settings)  # in a second, before the model libraries load
            _quiet_hub_libraries()
            settings, specs, defaults = _serving_setup(args, settings)
    except (ModelError, ValidationError, FileNotFoundError, ValueError, PortTaken, AuthRefused) as exc:
        return _error(exc)
    logs.configure(settings.log_level, settings.log_format, role=("api" if api_only else "serve"))
    tracing.setup(settings.otel_enabled, ("api" if api_only else "serve"), settings.otel_endpoint)
    banner = default_banner(defaults, settings.tiny_dir) if defaults else ""
    return _run_http(settings, specs, not api_only, banner)


class AuthRefused(Exception):
    """A process that would serve without API keys where nobody said so; str() is the one line the CLI prints."""


def _check_auth(settings: Settings, role: Role) -> None:
    """AuthRefused unless keys are configured or serving open is allowed (a loopback `serve`) or asked for."""
    from service.keys import auth_refusal

    hosts = [settings.host] if role != "grpc" else []
    if settings.grpc_enabled or role == "grpc":
        hosts.append(settings.grpc_host or settings.host)
    refusal = auth_refusal(settings, role, hosts)
    if refusal:
        raise AuthRefused(refusal)


def _check_ports(settings: Settings) -> None:
    """PortTaken for a port another process holds, HTTP or gRPC; both are bound for real in `_run_http`."""
    from service.ports import PortTaken, check_free

    if settings.grpc_enabled and settings.grpc_port == settings.port != 0:
        raise PortTaken(f"HTTP and gRPC cannot share port {settings.port}; give gRPC another with --grpc-port")
    check_free("HTTP", settings.host, settings.port, "--port")
    if settings.grpc_enabled:
        check_free("gRPC", settings.grpc_host or settings.host, settings.grpc_port, "--grpc-port")


def _run_http(settings: Settings, specs: list[ModelSpec], with_worker: bool, banner: str) -> int:
    """Bind HTTP, then gRPC, and only then say where the server listens and what it serves; a taken port is
    one `error:` line and exit status 2, before any model loads."""
    import asyncio

    import uvicorn

    from service.grpc.server import GrpcFrontend
    from service.ports import PortTaken, listen_http
    from service.processes import build_app

    try:
        sock = listen_http(settings.host, settings.port)
    except PortTaken as exc:
        return _error(exc)
    grpc = GrpcFrontend(settings) if settings.grpc_enabled else None
    app = build_app(settings, specs, with_worker=with_worker, grpc=grpc)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=None,  # keep our handlers (text or JSON, with request ids)
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        limit_concurrency=settings.http_limit_concurrency,  # beyond it uvicorn answers 503 at once
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        if grpc is not None:
            grpc.bind()  # in this loop, the one gRPC serves from
        host, port = sock.getsockname()[:2]
        where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        also = f" and gRPC {grpc.bound_address}" if grpc is not None else ""
        what = "" if with_worker else f" ({settings.queue} queue, API only)"
        models = ", ".join(s.id for s in specs) or "any model a worker serves"
        print(f"dense-serve listening on {where}{also}{what}, serving {models}", file=sys.stderr)
        print(f"  demo page {where}/, API docs {where}/docs; Ctrl+C stops it", file=sys.stderr)
        if banner:
            print(banner, file=sys.stderr)
        await server.serve(sockets=[sock])

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(serve())
    except PortTaken as exc:
        return _error(exc)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        print("error: the server did not start (the log above says why)", file=sys.stderr)
        return 3
    return 0


def redis_where(settings: Settings) -> str:
    """The Redis URL without its password, as start-up lines print it (they end up in shared logs)."""
    from service.queue.redis.connection import ConnectionOptions

    return ConnectionOptions(settings.redis_url).where


def _error(exc: BaseException | str) -> int:
    """The one spelling of a refusal: `error: what went wrong`, on stderr, exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_grpc(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from service.config import load_settings
    from service.ports import PortTaken, check_free
    from service.processes import frontend_probes, frontend_specs, preflight_queue, run_grpc

    try:
        keys = ("grpc_host", "grpc_port", "api_keys", "api_keys_dir", "auth", "queue", "redis_url", "metrics_port")
        settings = load_settings(args.config, **{k: getattr(args, k, None) for k in (*keys, "host", "probes")})
        specs = frontend_specs(args.models or settings.models)
        frontend_probes(settings.probes, specs)
        _check_auth(settings, "grpc")
        check_free("gRPC", settings.grpc_host or settings.host, settings.grpc_port, "--port")
        preflight_queue(settings)
    except (ModelError, ValidationError, FileNotFoundError, ValueError, PortTaken, AuthRefused) as exc:
        return _error(exc)
    logs.configure(settings.log_level, settings.log_format, role="grpc")
    tracing.setup(settings.otel_enabled, "grpc", settings.otel_endpoint)

    def announce(address: str) -> None:
        models = ", ".join(s.id for s in specs) or "any model a worker serves"
        print(
            f"dense-serve listening on gRPC {address} (queue {redis_where(settings)}), serving {models}",
            file=sys.stderr,
        )

    try:
        return asyncio.run(run_grpc(settings, specs, announce))
    except PortTaken as exc:
        return _error(exc)


def cmd_worker(args: argparse.Namespace) -> int:
    _quiet_hub_libraries()
    import asyncio

    from pydantic import ValidationError

    from service.processes import default_banner, run_worker

    try:
        settings, specs, defaults = _serving_setup(args)
    except (ModelError, ValidationError, FileNotFoundError, ValueError) as exc:
        return _error(exc)
    if defaults:
        print(default_banner(defaults, settings.tiny_dir), file=sys.stderr)
    logs.configure(settings.log_level, settings.log_format, role="worker")
    tracing.setup(settings.otel_enabled, "worker", settings.otel_endpoint)
    print(
        f"dense-serve worker {settings.worker_name or ''} on {redis_where(settings)}: {', '.join(s.id for s in specs)}",
        file=sys.stderr,
    )
    return asyncio.run(run_worker(settings, specs))


def cmd_models(args: argparse.Namespace) -> int:
    """The models `serve` serves when none is configured (and `predict` uses without --model), then the
    shipped specs of the published checkpoints."""
    from models.spec import shipped_specs
    from service.defaults import default_models, describe

    print("Served by default (serve, and predict without --model):")
    print("\n".join(f"  {row}" for row in describe(default_models(_settings_or_defaults().tiny_dir)).splitlines()))
    print("Shipped specs of published checkpoints (serve --model ID; fetched from the hub on first use):")
    for spec in shipped_specs().values():
        print(f"  {spec.id:34} {spec.family:8} {spec.output_kind:10} {spec.source}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    _quiet_hub_libraries()
    from models.tiny import make_tiny

    path = make_tiny(args.out, args.family, args.task, args.seed, scheduler=args.scheduler)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote tiny {args.family} {args.task} checkpoint (random weights, {size / 1e6:.1f} MB) to {path}")
    return 0


def output_files(pred: PredictionMap, stem: str, formats: Sequence[str], png_level: int = 1) -> dict[str, bytes]:
    from service.worker.encode import EncodeOptions, encode_prediction, encode_uncertainty_map

    options = EncodeOptions(png_level)
    files = {FILE_NAMES[fmt].format(f"{stem}_{pred.kind}"): encode_prediction(pred, fmt, options) for fmt in formats}
    if pred.uncertainty is not None:  # uncertainty=steps: the run's step change, beside its map
        for fmt in formats:
            data = encode_uncertainty_map(pred.uncertainty, pred.kind, "steps", fmt, options)
            files[FILE_NAMES[fmt].format(f"{stem}_{pred.kind}_uncertainty")] = data
    return files


def _predict_request(args: argparse.Namespace, task: str) -> PredictionRequest:
    """The flags as the same request REST and gRPC build, validated by the same rules."""
    fields = {
        "model": args.model,
        "task": task,
        "processing_res": args.processing_res,
        "match_input_resolution": args.match_input_resolution,
        "seed": args.seed,
        "steps": args.steps,
        "ensemble_size": args.ensemble_size,
        "uncertainty": args.uncertainty,
        "format": args.format[0],
    }
    return parse_request({k: v for k, v in fields.items() if v is not None}, Limits(max_processing_res=16384))


def cmd_predict(args: argparse.Namespace) -> int:
    """Decode the next chunk and encode the last one on a thread pool while the model runs this one."""
    if args.batch_size < 1:
        return _error("--batch-size must be >= 1")
    unreadable = {p: why for p in args.images if (why := _unreadable(p))}
    if len(unreadable) == len(args.images):  # nothing to predict: say so before seconds of model loading
        for path, why in unreadable.items():
            print(f"error: {path}: {why}", file=sys.stderr)
        return 2
    _quiet_hub_libraries()
    import os
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm import tqdm

    from models.inference import BatchItem
    from service import codec
    from service.worker.encode import FORM_OF
    from service.worker.prepare import decode_for

    max_pixels = args.max_pixels or codec.DEFAULT_MAX_PIXELS
    try:
        _predict_request(args, args.task or "depth")  # flags checked before minutes of model loading
        model = _load(args.model, args.device, args.dtype, args.task, args.backend)
        request = _predict_request(args, model.output_kind if model.output_kind == "normals" else "depth")
        probe = _depth_probe(args, model) if args.probe else None
        if probe is not None:  # a depth probe on the base model: one step, its own default processing size
            check_for_model(request, probe.id, model.family, False, 1)
            if request.processing_res is None:
                request = request.model_copy(update={"processing_res": probe.manifest.processing_res})
        else:
            check_for_model(request, model.model_id, model.family, model.multi_step, model.default_steps)
    except (ModelError, InvalidParameter, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(args.images)
    # One format: the map leaves the device in that format's form (uint16 for png, ...); several: float32.
    form = FORM_OF[args.format[0]] if len(args.format) == 1 else "float32"
    runner: DensePredictor | DepthProbe = probe or model
    chunk = args.batch_size * 8  # decode lazily: memory stays bounded for long file lists
    failed = 0
    start = time.perf_counter()

    def prepare(path: Path) -> BatchItem | str:
        try:
            pixels, geometry = decode_for(model, path, request.processing_res, max_pixels, args.jpeg_draft)
        except (codec.ImageDecodeError, ValueError) as exc:
            return f"error: {path}: {exc}"
        steps = request.steps if isinstance(request.steps, int) else None
        return BatchItem(
            pixels,
            geometry,
            model.resolve_seed(request.seed),
            request.match_input_resolution,
            form,
            steps,
            request.ensemble_size or 1,
            step_uncertainty=request.uncertainty == "steps",
        )

    def write(stem: str, pred: PredictionMap) -> None:
        for name, data in output_files(pred, stem, args.format, args.png_compression).items():
            (args.out / name).write_bytes(data)

    with (
        ThreadPoolExecutor(args.io_threads or os.cpu_count() or 4) as pool,
        tqdm(total=len(args.images), unit="img", disable=len(args.images) < 2, file=sys.stderr) as bar,
    ):
        spans = [(lo, min(lo + chunk, len(args.images))) for lo in range(0, len(args.images), chunk)]
        decoding = [pool.submit(prepare, p) for p in args.images[slice(*spans[0])]] if spans else []
        writing: list[Future[None]] = []
        for k, (lo, hi) in enumerate(spans):
            prepared = [f.result() for f in decoding]
            if k + 1 < len(spans):
                decoding = [pool.submit(prepare, p) for p in args.images[slice(*spans[k + 1])]]
            items, names = [], []
            for stem, result in zip(stems[lo:hi], prepared, strict=True):
                if isinstance(result, str):
                    failed += 1
                    bar.update(1)
                    tqdm.write(result, file=sys.stderr)
                else:
                    items.append(result)
                    names.append(stem)
            preds = runner.predict_items(items, batch_size=args.batch_size, on_batch=bar.update) if items else []
            for done in writing:
                done.result()  # the previous chunk is on disk before a third one is held in memory
            writing = [pool.submit(write, stem, pred) for stem, pred in zip(names, preds, strict=True)]
        for done in writing:
            done.result()
    done_count = len(args.images) - failed
    elapsed = time.perf_counter() - start
    what = f"{model.model_id}: {model.family} {model.output_kind}"
    if probe is not None:
        what = f"{probe.id}: {probe.kind} probe on {model.model_id}"
    print(f"{done_count} of {len(args.images)} images -> {args.out} ({what}, {elapsed:.2f} s)")
    if model.random_weights:  # the checkpoint's own mark, whatever --model named
        print(
            f"note: {model.model_id} has RANDOM WEIGHTS (a tiny test checkpoint): its maps are noise", file=sys.stderr
        )
    return 1 if failed else 0


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read (the reason decoding would give), or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"


def _depth_probe(args: argparse.Namespace, model: DensePredictor) -> DepthProbe:
    """The depth probe in `--probe` on the loaded base (hash-checked), serving `--probe-head`."""
    from models.loading import resolve_source
    from models.probes.depth_probe import DepthProbe

    heads = DepthProbe.attach(args.probe, model, resolve_source(_model_spec(args.model, args.task)))
    if args.probe_head is None:
        return heads[0]
    chosen = [p for p in heads if p.head == args.probe_head]
    if not chosen:
        raise ValueError(f"probe {args.probe} has no {args.probe_head} head")
    return chosen[0]


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names per input; a name already taken (same stem, other folder) gets -1, -2, ... appended."""
    taken: set[str] = set()
    stems: list[str] = []
    for path in paths:
        name, n = path.stem, 0
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}"
        taken.add(name)
        stems.append(name)
    return stems


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_hub_libraries()
    from models.export.exporter import export_model
    from models.spec import resolve_spec

    try:
        spec = resolve_spec(args.model, task=args.task)
        manifest = export_model(
            spec,
            args.format,
            args.out,
            dtype=args.dtype,
            max_batch=args.max_batch,
            resolutions=args.resolutions,
            opset=args.opset,
            device=args.device,
            triton_instance_kind=args.triton_instance_kind,
        )
    except (ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    v = manifest.verification
    assert v is not None
    print(
        f"exported {manifest.model_id} ({manifest.family} {manifest.output_kind}) as {manifest.format} "
        f"{manifest.dtype} to {args.out}: max abs error {v.max_abs_error:.3g} vs PyTorch "
        f"(tolerance {v.tolerance:g}, {v.runtime} {v.provider})"
    )
    return 0


SEGMENT_FILES = {"png": "{}_classes.png", "npy": "{}_classes.npy", "color": "{}_overlay.png", "json": "{}.json"}


def cmd_segment(args: argparse.Namespace) -> int:
    """The CLI face of `/v1/segment`: the same request vocabulary, the same encoders, files instead of bodies."""
    import json

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    try:
        requests = [
            parse_request(
                {
                    "task": "segment",
                    "format": f,
                    "processing_res": args.processing_res,
                    "with_depth": args.with_depth and f == "json",
                },
                Limits(max_processing_res=16384),
            )
            for f in formats
        ]
    except InvalidParameter as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _quiet_hub_libraries()
    from models.inference import BatchItem
    from models.probes.cli import _attached
    from service import codec
    from service.worker.encode import encode_prediction, encode_segmentation, map_metadata, segmentation_metadata

    try:
        probe = _attached(args.probe, args.model)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    res = args.processing_res if args.processing_res is not None else probe.manifest.processing_res
    failed = 0
    for stem, path in zip(_unique_stems(args.images), args.images, strict=True):
        try:
            pixels = codec.decode_pixels(path, codec.DEFAULT_MAX_PIXELS).pixels
            item = BatchItem(pixels, probe.base.plan(pixels, res), form="float32")
        except (codec.ImageDecodeError, ValueError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        (seg,), depth = probe.segment([item], with_depth=args.with_depth)
        for req in requests:
            target = args.out / SEGMENT_FILES[req.format].format(stem)
            if req.format != "json":
                target.write_bytes(encode_segmentation(seg, req.format, pixels))  # type: ignore[arg-type]
                continue
            meta = segmentation_metadata(seg, depth[0] if depth else None).model_dump(exclude_none=True)
            if depth:
                meta["depth"] = map_metadata(depth[0]).model_dump(exclude_none=True)
                (args.out / f"{stem}_depth.npy").write_bytes(encode_prediction(depth[0], "npy"))
            target.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{path} -> {args.out}: {', '.join(f'{k} {v}' for k, v in seg.pixel_counts().items() if v)}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
