"""`dense-serve finetune` and `dense-serve eval`: argparse registration and handlers returning exit codes.

Exit codes: 0 done, 1 the run or evaluation failed, 2 the config, model or data arguments are unusable.
Heavy imports (torch, diffusers, accelerate) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models.spec import BACKEND_CHOICES


def _resume(value: str) -> str | Path:
    return value if value in ("auto", "never") else Path(value)


def _processing_res(value: str) -> int:
    n = int(value)
    if n < 0 or n % 8:
        raise argparse.ArgumentTypeError(f"processing resolution must be 0 or a multiple of 8, got {n}")
    return n


def add_finetune_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `finetune CONFIG.yaml` on argparse subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "finetune",
        help="fine-tune a Lotus-G / Lotus-D / E2E-FT model from a YAML config (see docs/training.md)",
        description="Train, checkpoint, export a servable model + spec, and evaluate it. Several GPUs: "
        "accelerate launch --multi_gpu --num_processes N -m service.cli finetune CONFIG.yaml",
    )
    p.add_argument("config", type=Path, help="run config (.yaml)")
    p.add_argument(
        "--resume",
        type=_resume,
        default="auto",
        metavar="auto|never|CHECKPOINT",
        help="auto (default): continue from the latest checkpoint in output_dir; never: refuse if there is one; "
        "or a checkpoint folder",
    )
    p.add_argument(
        "--stop-after", type=int, metavar="STEPS", help="stop (with a checkpoint) once this many total steps are done"
    )
    p.add_argument("--output-dir", type=Path, help="override run.output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_finetune)
    return p


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `eval --model SPEC --data DIR` on argparse subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "eval",
        help="score a model on folder-format datasets (AbsRel/delta1 or angular errors), Markdown/JSON table",
    )
    p.add_argument("--model", required=True, help="spec .toml, local diffusers folder, shipped spec id or hub id")
    p.add_argument("--data", type=Path, action="append", required=True, metavar="DIR", help="dataset (repeatable)")
    p.add_argument("--out", type=Path, action="append", metavar="FILE", help="write the table: .md or .json")
    p.add_argument("--processing-res", type=_processing_res, help="long edge to predict at (default: the model's)")
    p.add_argument("--limit", type=int, help="at most this many images per dataset")
    p.add_argument("--seed", type=int, help="Lotus-G noise seed (default: the spec's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, help="runtime (default: the spec's; auto = torch)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the spec's)")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--task", choices=("depth", "normals"), help="override the detected task")
    p.add_argument("--label", help="row label in the table (default: the model id)")
    p.add_argument(
        "--train-data",
        type=Path,
        metavar="DIR",
        help="training set (folder format) for the mean-map baseline (default: leave-one-out over each --data)",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="leave out the image-independent baselines (mean map, vertical ramp, constant) scored beside the model",
    )
    p.set_defaults(func=cmd_eval)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    from models.training.config import load_config

    try:
        cfg = load_config(args.config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output_dir is not None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": args.output_dir})})
    from models.errors import ModelError
    from models.training.evaluate import to_markdown
    from models.training.trainer import finetune

    try:
        result = finetune(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except (ModelError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, ArithmeticError, OSError) as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    if not result.finished:
        print(f"stopped at step {result.step} of {cfg.train.steps}; run again to resume from {result.output_dir}")
        return 0
    print(f"exported {result.model_dir} and {result.spec_path} (step {result.step})")
    print(f"serve it with: dense-serve serve --model {result.spec_path}")
    if result.evaluations:
        print(to_markdown(result.evaluations), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from models.errors import ModelError
    from models.loading import load_model
    from models.spec import resolve_spec
    from models.training.baselines import evaluate_baselines, mean_map_of_folder
    from models.training.evaluate import evaluate_dataset, to_markdown, write_results

    for root in [*args.data, *([args.train_data] if args.train_data else [])]:
        if not (root / "dataset.json").is_file():
            print(f"error: {root} is not a folder-format dataset (no dataset.json)", file=sys.stderr)
            return 2
    try:
        model = load_model(
            resolve_spec(args.model, task=args.task), device=args.device, dtype=args.dtype, backend=args.backend
        )
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    try:
        mean = None
        if args.train_data is not None and not args.no_baselines:
            mean = mean_map_of_folder(model.output_kind, args.train_data)
        for root in args.data:
            results.append(
                evaluate_dataset(
                    model,
                    root,
                    processing_res=args.processing_res,
                    limit=args.limit,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    label=args.label,
                    progress=sys.stderr.isatty(),
                )
            )
            if not args.no_baselines:
                results.extend(evaluate_baselines(root, model.output_kind, limit=args.limit, mean_map=mean))
    except (ValueError, OSError, ModelError) as exc:
        print(f"error: evaluation failed: {exc}", file=sys.stderr)
        return 1
    print(to_markdown(results), end="")
    for path in args.out or []:
        write_results(results, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0
