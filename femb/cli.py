"""The `femb` command line (also `python -m femb`): one sub-command per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from femb import __version__
from femb.errors import FembError, argument_names


def _cmd_synth(args: argparse.Namespace) -> None:
    from femb.data.synth import synthesize

    sizes = {
        "identities": args.identities,
        "images_per_identity": args.images_per_identity,
        "pairs": args.pairs,
        "loose_identities": args.loose_identities,
        "loose_images_per_identity": args.loose_images_per_identity,
        "ijb_subjects": args.ijb_subjects,
    }
    flags = {name: f"--{name.replace('_', '-')}" for name in (*sizes, "seed")}
    with argument_names(flags):
        summary = synthesize(
            Path(args.dir), seed=args.seed, **{k: v for k, v in sizes.items() if v is not None}
        )
    print(json.dumps(summary))


_CONVERT_FLAGS = {
    "shard_size_mb": "--shard-size-mb",
    "workers": "--workers",
    "source_kind": "--source-kind",
    "root": "--root",
    "landmarks": "--landmarks",
    "image_size": "--image-size",
    "jpeg_quality": "--jpeg-quality",
}
_LANDMARKS_FLAG = {"`landmarks`": "--landmarks"}  # named inside messages, in backticks


def _image_options(args: argparse.Namespace) -> dict:
    """The options every command that reads loose image files shares."""
    return {
        "root": Path(args.root) if args.root else None,
        "landmarks": Path(args.landmarks) if args.landmarks else None,
        "image_size": args.image_size,
        "jpeg_quality": args.jpeg_quality,
        "lossless": args.lossless,
    }


def _cmd_convert(args: argparse.Namespace) -> None:
    from femb.data.convert import convert

    with argument_names(_CONVERT_FLAGS), argument_names(_LANDMARKS_FLAG, anywhere=True):
        manifest = convert(
            Path(args.src),
            Path(args.out),
            shard_size_mb=args.shard_size_mb,
            workers=args.workers,
            verify=args.verify,
            source_kind=args.source_kind,
            pairs=[Path(p) for p in args.pairs],
            skip_bad=args.skip_bad,
            **_image_options(args),
        )
    shards = manifest["shards"]
    skipped = len(manifest.get("skipped", []))
    print(
        f"femb convert: {manifest['num_images']} images of {manifest['num_classes']} identities "
        f"in {len(shards)} shard(s), {len(manifest.get('pairs', {}))} pair set(s) -> {args.out}"
        + (f" ({skipped} image(s) skipped, listed in the manifest)" if skipped else "")
    )


def _cmd_pairs(args: argparse.Namespace) -> None:
    from femb.data.pairs import convert_pairs

    with argument_names(_CONVERT_FLAGS), argument_names(_LANDMARKS_FLAG, anywhere=True):
        summary = convert_pairs(
            Path(args.pairs), Path(args.output), workers=args.workers, **_image_options(args)
        )
    print(json.dumps(summary))


def _cmd_pack(args: argparse.Namespace) -> None:
    from femb.data.pack import pack

    with argument_names({"seed": "--seed"}):
        summary = pack(Path(args.shards), Path(args.out), shuffle=args.shuffle, seed=args.seed)
    print(json.dumps(summary))


def _cmd_embed(args: argparse.Namespace) -> None:
    from femb.embed import run_embed

    summary = run_embed(
        args.backbone,
        Path(args.weights),
        Path(args.output),
        [Path(p) for p in args.images],
        batch_size=args.batch_size,
        flip=args.flip,
        normalize=args.normalize,
        device=args.device,
    )
    print(json.dumps(summary))


def _cmd_train(args: argparse.Namespace) -> None:
    from femb.config import load_params
    from femb.training.run import train

    summary = train(load_params(args.params, args.set))
    if summary:  # rank 0 only
        print(json.dumps(summary))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from femb.evaluation.evaluate import default_ijb_cache, ijb_summary_line, run_evaluate

    cache = None if args.no_ijb_cache else Path(args.ijb_cache) if args.ijb_cache else default_ijb_cache()
    metrics = run_evaluate(
        Path(args.weights),
        [Path(s) for s in args.sets],
        Path(args.output),
        backbone=args.backbone,
        batch_size=args.batch_size,
        device=args.device,
        plots_dir=Path(args.plots) if args.plots else None,
        ijb_normalize_images=args.ijb_normalize_images,
        ijb_faceness=not args.ijb_no_faceness,
        ijb_cache=cache,
    )
    for name, result in metrics.items():
        if isinstance(result, dict) and "accuracy" in result:
            print(f"{name}: accuracy {100 * result['accuracy']:.2f}% +- {100 * result['accuracy_std']:.2f}")
        elif isinstance(result, dict):
            print(ijb_summary_line(name, result))


def _cmd_export(args: argparse.Namespace) -> None:
    from femb.export.model_card import write_model_card
    from femb.export.onnx import export_onnx

    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as err:
            raise FembError(f"{args.metrics}: cannot read the metrics JSON ({err})") from None
        bad = not isinstance(metrics, dict) or any(
            isinstance(v, dict)
            and not isinstance(v.get("accuracy"), (int, float))  # a pair set
            and not isinstance(v.get("tar_at_far"), dict)  # an IJB release
            for v in metrics.values()
        )
        if bad:
            raise FembError(
                f"{args.metrics}: not a metrics file of femb evaluate (set -> accuracy or tar_at_far, ...)"
            )
    info = export_onnx(
        Path(args.weights),
        Path(args.output),
        backbone=args.backbone,
        header=args.header,
        dataset_fingerprint=args.fingerprint,
        fp16=args.fp16,
        opset=args.opset,
    )
    write_model_card(Path(args.output).with_suffix(".md"), info, metrics)
    print(json.dumps({k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}))


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="directory the paths of an image or pair list are under")
    p.add_argument(
        "--landmarks",
        default=None,
        help="five landmarks per image (`name x1 y1 ... x5 y5 [score]` lines or a CSV); aligns every image",
    )
    p.add_argument("--image-size", type=int, default=112, help="side of the aligned crops (default 112)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images (default 95)")
    p.add_argument("--lossless", action="store_true", help="re-encode as PNG instead of JPEG")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="femb", description=__doc__)
    parser.add_argument("--version", action="version", version=f"femb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a demo face dataset in the InsightFace layout")
    p.add_argument("dir", help="output directory (train.rec/.idx/property, .bin pair sets, loose/, IJBC/)")
    p.add_argument("--identities", type=int, default=None, help="training identities")
    p.add_argument("--images-per-identity", type=int, default=None, help="images per training identity")
    p.add_argument("--pairs", type=int, default=None, help="pairs per verification set")
    p.add_argument(
        "--loose-identities",
        type=int,
        default=None,
        help="people of DIR/loose: loose 250x250 photos, landmarks.txt, LFW pairs.txt (default 20; 0: none)",
    )
    p.add_argument(
        "--loose-images-per-identity", type=int, default=None, help="loose photos per person (default 5)"
    )
    p.add_argument(
        "--ijb-subjects",
        type=int,
        default=None,
        help="subjects of DIR/IJBC, a demo set in the IJB-C release layout (default 30; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "convert", help="InsightFace RecordIO, an image folder or an image list -> Parquet shards"
    )
    p.add_argument(
        "src",
        help="InsightFace directory (train.rec/.idx/property, *.bin), image folder (<identity>/<image>) "
        "or image list (`path label` lines)",
    )
    p.add_argument("out", help="output directory for the shards, pair files and manifest.json")
    p.add_argument(
        "--source-kind",
        choices=("auto", "insightface", "folder", "list"),
        default="auto",
        help="what SRC is (default: detected)",
    )
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (default 256)")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: one per core)")
    p.add_argument("--verify", action="store_true", help="decode every image and report corrupt ones")
    _add_image_options(p)
    p.add_argument(
        "--pairs",
        action="append",
        default=[],
        metavar="FILE",
        help="a verification pair list (LFW pairs.txt, or left,right,is_same CSV) to add as a pair set; repeatable",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable or mislabelled images (listed in the manifest)",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("pairs", help="a verification pair list (LFW pairs.txt or CSV) -> a pair .parquet")
    p.add_argument("pairs", help="LFW pairs.txt (folds x pairs header) or a left,right,is_same CSV")
    p.add_argument("output", help="output pair .parquet, as femb evaluate takes")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: one per core)")
    _add_image_options(p)
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser(
        "pack", help="Parquet shards -> InsightFace train.rec/.idx/property and .bin pair sets"
    )
    p.add_argument("shards", help="a shard directory written by femb convert")
    p.add_argument("out", help="output directory (train.rec, train.idx, property, <set>.bin)")
    p.add_argument("--shuffle", action="store_true", help="write the images in a seeded random order (DALI)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("embed", help="embed aligned 112x112 face crops into an N x D .npy")
    p.add_argument(
        "images", nargs="+", help="aligned face crops (any format PIL reads; other sizes are resized)"
    )
    p.add_argument(
        "--weights", required=True, help="backbone.pth, model.pt, femb/Lightning checkpoint or .onnx"
    )
    p.add_argument(
        "--backbone", default=None, help="architecture (default: read from or inferred by the weights)"
    )
    p.add_argument("--output", "-o", required=True, help="output .npy file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--flip", action="store_true", help="add the embedding of the mirrored image (as evaluation does)"
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "evaluate", help="InsightFace verification on .bin / pair .parquet sets and IJB-B/C releases"
    )
    p.add_argument(
        "sets",
        nargs="+",
        help="pair sets (InsightFace .bin or pair .parquet files) and IJB-B/C release directories "
        "(loose_crop/, meta/)",
    )
    p.add_argument(
        "--weights", required=True, help="backbone.pth, model.pt, femb/Lightning checkpoint or .onnx"
    )
    p.add_argument(
        "--backbone", default=None, help="architecture (default: read from or inferred by the weights)"
    )
    p.add_argument("--output", "-o", required=True, help="metrics .json")
    p.add_argument(
        "--plots",
        default=None,
        help="directory for roc.png, evr.png and per set roc_<set>.csv, evr_<set>.csv, quality_<set>.csv",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--ijb-normalize-images",
        action="store_true",
        help="IJB: L2-normalise each image feature before pooling (eval_ijbc.py mode N0)",
    )
    p.add_argument(
        "--ijb-no-faceness",
        action="store_true",
        help="IJB: do not weight image features by the detector's faceness score (mode D0)",
    )
    p.add_argument(
        "--ijb-cache",
        default=None,
        metavar="DIR",
        help="IJB image features cached here as .npy, keyed by weights and release "
        "(default $XDG_CACHE_HOME/femb/ijb, i.e. ~/.cache/femb/ijb)",
    )
    p.add_argument("--no-ijb-cache", action="store_true", help="IJB: embed again, keep nothing")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="export a backbone to ONNX and prove parity with onnxruntime")
    p.add_argument("--weights", required=True, help="backbone.pth, model.pt or femb/Lightning checkpoint")
    p.add_argument(
        "--backbone", default=None, help="architecture (default: read from or inferred by the weights)"
    )
    p.add_argument(
        "--output", "-o", required=True, help="output .onnx (a model card .md is written beside it)"
    )
    p.add_argument("--header", default=None, help="head the model was trained with (metadata)")
    p.add_argument("--fingerprint", default=None, help="training data fingerprint (metadata)")
    p.add_argument("--metrics", default=None, help="metrics .json of femb evaluate, for the model card")
    p.add_argument("--fp16", action="store_true", help="export float16 weights (input/output stay float32)")
    p.add_argument("--opset", type=int, default=18)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", help="train a backbone + head on Parquet shards (resumes a cut-short run)")
    p.add_argument(
        "--params", default="params.yaml", help="params file (default params.yaml; missing: defaults)"
    )
    p.add_argument(
        "--set",
        "-S",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. train.lr=0.05",
    )
    p.set_defaults(func=_cmd_train)
    return parser


def _command_name(argv: Sequence[str]) -> str:
    for arg in argv:
        if not arg.startswith("-"):
            return f"femb {arg}"
    return "femb"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; a user error prints one line to stderr and returns 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except FembError as err:
        print(f"{_command_name(argv)}: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a path the user gave cannot be read or written (missing, denied, disk full)
        where = f"{err.filename}: " if err.filename else ""
        print(f"{_command_name(argv)}: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_command_name(argv)}: interrupted", file=sys.stderr)
        return 130
    return 0
