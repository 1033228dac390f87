"""`dense-serve probe train | curve | bench`: train a probe, measure mIoU against the number of labelled images,
and measure what a probe costs next to its base model's own prediction."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


def _counts(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from exc
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def add_probe_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help="pixel probes on a served model's UNet features (segmentation, depth)")
    psub = p.add_subparsers(dest="probe_command", required=True)

    t = psub.add_parser("train", help="train a probe from a YAML config (configs/probe-seg-synthetic.yaml)")
    t.add_argument("config", type=Path)
    t.add_argument("--out", type=Path, help="output folder (default: the config's output_dir)")
    t.set_defaults(func=cmd_train)

    c = psub.add_parser("curve", help="held-out mIoU (depth: AbsRel) against labelled images")
    c.add_argument("config", type=Path)
    c.add_argument("--counts", type=_counts, default=[5, 10, 20, 40], help="comma list (default 5,10,20,40)")
    c.add_argument("--strides", type=_counts, help="comma list of feature strides to compare (default: the config's)")
    c.add_argument("--out", type=Path, default=Path("runs/probe-curve"), help="probes and curve.json go here")
    c.set_defaults(func=cmd_curve)

    b = psub.add_parser("bench", help="serving cost of a probe against its base model's prediction")
    b.add_argument("probe", type=Path, help="a trained probe folder")
    b.add_argument("--model", help="the base model (spec .toml, folder or id; default: the probe's training base)")
    b.add_argument("--processing-res", type=int, help="default: the probe's")
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then comparable)")
    b.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="the base model's runtime (onnxruntime: the probe runs from its ONNX graph)",
    )
    b.add_argument("--engine-cache", type=Path, help="where exports go (default .cache/engines)")
    b.set_defaults(func=cmd_bench)

    m = psub.add_parser("make-synthetic", help="write labelled synthetic scenes in the probe folder format")
    m.add_argument("out", type=Path)
    m.add_argument("--count", type=int, default=20)
    m.add_argument("--size", type=int, default=128, help="square image size (default 128)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_synthetic)

    x = psub.add_parser(
        "export",
        help="ONNX graph of the base head + taps + MLPs (probe_head.onnx; served as is from DIR/probe_head.onnx)",
    )
    x.add_argument("probe", type=Path, help="a trained probe folder")
    x.add_argument("--model", help="the base model (default: the probe's training base)")
    x.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    x.set_defaults(func=cmd_export)


def depth_bench(probe: Any, items: list[Any], base_ms: tuple[float, float], timed: Any, args: Any, res: int) -> int:
    """`probe bench` for a depth probe: the base model's map against each head's, per batch."""
    m = probe.manifest
    rows = [(f"base prediction ({probe.base.output_kind})", base_ms)]
    for head in ("strong", "weak") if m.weak_blocks else ("strong",):
        rows.append((f"depth probe, {head} head", timed(lambda head=head: probe.depth(items, head=head))))
    print(
        f"{m.id} on {m.base_model} ({probe.base.runtime.name}), {res} px, batch {args.batch_size}, "
        f"{args.threads} thread(s), serving timesteps "
        f"{probe.taps.timesteps}, median of {args.repeats}:"
    )
    print("| answer | wall ms | CPU ms | CPU vs base prediction |")
    print("|---|---:|---:|---:|")
    for name, (w, c) in rows:
        print(f"| {name} | {w:.1f} | {c:.1f} | {c / base_ms[1]:.2f}x |")
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from models.probes.data import synthetic, synthetic_depth, write_depth_folder, write_folder

    classes, images = synthetic(args.count, args.size, args.size, args.seed)
    write_folder(args.out, classes, images)
    depth_range, depths = synthetic_depth(args.count, args.size, args.size, args.seed)
    write_depth_folder(args.out, depths, depth_range)  # the same scenes: depth/ for depth probes
    print(f"wrote {len(images)} labelled scenes ({', '.join(classes)}; depth/) to {args.out}")
    return 0


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from models.errors import ModelError
    from models.probes.job import load_config
    from models.probes.train import train_probe

    _logging()
    try:
        cfg = load_config(args.config)
        report = train_probe(cfg, args.out)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or cfg.output_dir
    if cfg.task == "depth":
        print(depth_summary(cfg.id, str(out), report))
        return 0
    base = report["majority_baseline"]
    print(
        f"probe {cfg.id} -> {out}: held-out mIoU {report['miou']:.3f}, pixel accuracy {report['pixel_accuracy']:.3f} "
        f"(majority class '{report['majority_class']}': mIoU {base['miou']:.3f}, accuracy "  # type: ignore[index]
        f"{base['pixel_accuracy']:.3f}) in {report['seconds']['total']:.0f} s"  # type: ignore[index]
    )
    return 0


def depth_summary(probe_id: str, out: str, report: dict[str, Any]) -> str:
    """One line of a depth probe's eval.json: both heads and the best image-independent baseline."""
    best = report["best_baseline"]
    base = report["baselines"][best]
    weak = report.get("weak")
    weak_text = f", weak {weak['abs_rel']:.3f} / {weak['delta1']:.3f}" if weak else ""
    return (
        f"depth probe {probe_id} -> {out}: held-out AbsRel / delta1 strong {report['strong']['abs_rel']:.3f} / "
        f"{report['strong']['delta1']:.3f}{weak_text} (best baseline, {best}: {base['abs_rel']:.3f} / "
        f"{base['delta1']:.3f}) in {report['seconds']['total']:.0f} s"
    )


def depth_curve_table(rows: list[dict[str, Any]]) -> str:
    """AbsRel / delta1 against labelled images: strong, weak, the three baselines (markdown)."""
    from models.training.baselines import BASELINES

    head = "| labelled images | strong | weak | " + " | ".join(BASELINES) + " | train s |"
    lines = [head, "|---:|" + "---:|" * (3 + len(BASELINES))]

    def cell(m: dict[str, float] | None) -> str:
        return f"{m['abs_rel']:.3f} / {m['delta1']:.3f}" if m else "-"

    for r in rows:
        cells = [cell(r["strong"]), cell(r.get("weak"))] + [cell(r["baselines"][b]) for b in BASELINES]
        lines.append(f"| {r['labelled_images']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def cmd_curve(args: argparse.Namespace) -> int:
    """The same config with the first N training images, for each N: one probe and one evaluation each."""
    from models.probes.job import FolderSource, load_config
    from models.probes.train import train_probe

    _logging()
    cfg = load_config(args.config)
    if cfg.task == "depth":
        return depth_curve(cfg, args)
    rows = []
    for stride in args.strides or [cfg.features.stride]:
        for n in args.counts:
            source = cfg.train_data
            update = {"limit": n} if isinstance(source, FolderSource) else {"count": n}
            run = cfg.model_copy(
                update={
                    "train_data": source.model_copy(update=update),
                    "features": cfg.features.model_copy(update={"stride": stride}),
                }
            )
            report = train_probe(run, args.out / f"s{stride}-n{n}")
            base = report["majority_baseline"]
            rows.append(
                {
                    "labelled_images": n,
                    "stride": stride,
                    "miou": report["miou"],
                    "pixel_accuracy": report["pixel_accuracy"],
                    "majority_miou": base["miou"],  # type: ignore[index]
                    "majority_accuracy": base["pixel_accuracy"],  # type: ignore[index]
                    "seconds": report["seconds"]["total"],  # type: ignore[index]
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| labelled images | stride | mIoU | pixel acc. | majority-class mIoU / acc. | train s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['labelled_images']} | {r['stride']} | {r['miou']:.3f} | {r['pixel_accuracy']:.3f} | "
            f"{r['majority_miou']:.3f} / {r['majority_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    return 0


def depth_curve(cfg: Any, args: argparse.Namespace) -> int:
    """`probe curve` for a depth config: AbsRel / delta1 of both heads and of the baselines per N."""
    from models.probes.job import FolderSource
    from models.probes.train import train_probe

    rows = []
    for n in args.counts:
        source = cfg.train_data
        update = {"limit": n} if isinstance(source, FolderSource) else {"count": n}
        report = train_probe(
            cfg.model_copy(update={"train_data": source.model_copy(update=update)}), args.out / f"n{n}"
        )
        rows.append(
            {
                "labelled_images": n,
                "strong": report["strong"],
                "weak": report.get("weak"),
                "baselines": report["baselines"],
                "base_prediction": report["base_prediction"],
                "seconds": report["seconds"]["total"],
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("held-out AbsRel / delta1 (aligned by least squares per image), mean map from the N training images:")
    print(depth_curve_table(rows))
    return 0


def _attached(folder: Path, model: str | None, backend: str = "torch", cache: Path | None = None) -> Any:
    from models.loading import load_model, resolve_source
    from models.probes.artifact import ProbeManifest
    from models.probes.segmenter import Probe
    from models.spec import resolve_spec

    manifest = ProbeManifest.read(folder)
    extra = {"engine_cache": str(cache)} if cache is not None else {}
    spec = resolve_spec(
        model or manifest.base_spec or manifest.base_source, backend=backend, dtype="fp32", device="cpu", **extra
    )
    spec = spec.model_copy(update={"id": manifest.base_model})
    base = load_model(spec)
    if manifest.task == "depth":
        from models.probes.depth_probe import DepthProbe

        return DepthProbe.attach(folder, base, resolve_source(spec), cache)[0]
    return Probe.attach(folder, base, resolve_source(spec), cache)


def cmd_export(args: argparse.Namespace) -> int:
    from models.errors import ModelError
    from models.probes.onnx_graph import (
        DEPTH_LAYOUT,
        logits_graph,
        probe_key,
        pruned_graph,
        sidecar,
        write_depth_graph,
        write_graph,
    )

    _logging()
    try:
        probe = _attached(args.probe, args.model)
    except (ModelError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if probe.base.multi_step:
        print(
            f"error: {args.probe} runs on a multi-step base ({probe.base.family}), which has no one-pass ONNX export; "
            "its probes are served on the torch backend",
            file=sys.stderr,
        )
        return 2
    inputs = f"latent{', noise' if probe.core.generative else ''}"
    if probe.manifest.task == "depth":
        key = probe_key(args.probe, DEPTH_LAYOUT)
        path = write_depth_graph(probe.core, probe.taps, probe.heads, args.out, key)
        heads = "depth_strong, depth_weak" if probe.manifest.weak_blocks else "depth_strong"
        print(
            f"wrote {path} (and {pruned_graph(path, 'depth').name}, the depth grids alone; {sidecar(path).name}, "
            f"the probe's key): inputs {inputs}; outputs map, features, {heads} (serving timesteps "
            f"{list(probe.taps.timesteps)})"
        )
        return 0
    path = write_graph(probe.core, probe.taps, probe.ensemble, args.out, probe_key(args.probe))
    print(
        f"wrote {path} (and {logits_graph(path).name}, the logits alone; {sidecar(path).name}, the probe's key): "
        f"inputs {inputs}; outputs map, features, logits"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Per batch, in one run: the base model's prediction, the probe alone, and probe + depth from one pass."""
    import numpy as np
    import torch

    from models.inference import BatchItem

    _logging()
    probe = _attached(args.probe, args.model, args.backend, args.engine_cache)
    manifest, base = probe.manifest, probe.base
    res = args.processing_res or manifest.processing_res
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    items = [BatchItem(image, base.plan(image, res))] * args.batch_size

    def timed(call: Any) -> tuple[float, float]:
        """Median wall and CPU milliseconds (CPU time stays meaningful on a shared, busy machine)."""
        call()  # warm-up
        wall, cpu = [], []
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            call()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        return float(np.median(wall)) * 1000.0, float(np.median(cpu)) * 1000.0

    torch.set_num_threads(args.threads)
    base_ms = timed(lambda: base.predict_batch(items))
    if manifest.task == "depth":
        return depth_bench(probe, items, base_ms, timed, args, res)
    probe_ms = timed(lambda: probe.segment(items))
    both_ms = timed(lambda: probe.segment(items, with_depth=True))
    two = (probe_ms[0] + base_ms[0], probe_ms[1] + base_ms[1])
    kind = base.output_kind
    print(
        f"{manifest.id} on {manifest.base_model} ({base.runtime.name}), {res} px, batch {args.batch_size}, "
        f"{args.threads} thread(s), "
        f"median of {args.repeats}:"
    )
    print("| answer | wall ms | CPU ms | CPU vs base prediction |")
    print("|---|---:|---:|---:|")
    for name, (w, c) in (
        (f"base prediction ({kind})", base_ms),
        ("segment (probe)", probe_ms),
        (f"segment + {kind}, one UNet pass", both_ms),
        (f"segment and {kind} as two requests", two),
    ):
        print(f"| {name} | {w:.1f} | {c:.1f} | {c / base_ms[1]:.2f}x |")
    return 0
