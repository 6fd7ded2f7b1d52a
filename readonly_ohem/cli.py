"""The ``readonly-ohem`` command: argument parsing only.

Each sub-command calls exactly one function of ``readonly_ohem.commands``, named in ``COMMANDS``,
with the parsed arguments as keyword arguments (argparse ``dest`` names). User errors
(``OhemError``) are printed as one line without a traceback and give exit status 2; so do
``OSError`` s (a path given that cannot be read or written), named by their file.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from readonly_ohem.errors import OhemError

# sub-command -> "module:function" (one module per command under readonly_ohem.commands), imported
# when that command runs, so that --help and argument errors need no torch; the function
# receives the parsed options as keywords.
COMMANDS = {
    "net": "readonly_ohem.commands.net:net_command",
    "run": "readonly_ohem.commands.run:run_command",
    "train": "readonly_ohem.commands.train:train_command",
    "test": "readonly_ohem.commands.test:test_command",
    "eval": "readonly_ohem.commands.eval:eval_command",
    "make-minivoc": "readonly_ohem.commands.make_minivoc:make_minivoc_command",
    "voc2coco": "readonly_ohem.commands.voc2coco:voc2coco_command",
    "proposals": "readonly_ohem.commands.proposals:proposals_command",
    "inspect": "readonly_ohem.commands.inspect:inspect_command",
    "demo": "readonly_ohem.commands.demo:demo_command",
    "experiment": "readonly_ohem.commands.experiment:experiment_command",
}


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``BLOB=d0,d1,...`` -> (blob, dims); dims are non-negative integers."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.split(","))
        if any(d < 0 for d in shape):
            raise ValueError
        return name, shape
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants BLOB=d0,d1,..., got {text!r}") from None


def _add_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", action="append", default=[], metavar="FILE.yml",
                   help="original-style experiment config (may repeat; merged in order)")
    p.add_argument("--set", dest="set_pairs", action="append", nargs=2, default=[],
                   metavar=("KEY", "VALUE"),
                   help="set a config key, value read as a Python literal (may repeat)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="readonly-ohem",
        description="Caffe-exact Fast R-CNN + Online Hard Example Mining in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("net", help="print a net's layer table (as Caffe does at start-up)")
    p.add_argument("prototxt")
    p.add_argument("--phase", choices=["TRAIN", "TEST"], default="TRAIN")
    p.add_argument("--shape", dest="shapes", action="append", type=_shape, default=[],
                   metavar="BLOB=d0,d1,...", help="shape of a net input or data-layer top")
    p.add_argument("--weights", help=".caffemodel to load (reports names missing on either side)")
    p.add_argument("--json", dest="json_path", metavar="FILE|-", help="also write the summary as JSON")
    p.add_argument("--allow-python-import", dest="allow_python_import", action="store_true",
                   help="import Python layer modules the spec names that are not built in")

    p = sub.add_parser("run", help="one forward (and backward), or N solver iterations, on arrays")
    p.add_argument("prototxt")
    p.add_argument("--inputs", required=True, metavar="IN.npz")
    p.add_argument("--out", required=True, metavar="OUT.npz")
    p.add_argument("--weights", metavar="W.caffemodel")
    p.add_argument("--phase", choices=["TRAIN", "TEST"], default="TRAIN")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--top-diff", dest="top_diff", metavar="TOPDIFF.npz",
                   help="seed the backward with these diffs on the named blobs")
    p.add_argument("--solver", metavar="SOLVER.prototxt")
    p.add_argument("--iters", type=int, default=1)
    _add_cfg(p)
    p.add_argument("--allow-python-import", dest="allow_python_import", action="store_true",
                   help="import Python layer modules the spec names that are not built in")

    p = sub.add_parser("train", help="train from a solver.prototxt (the original train_net.py)")
    p.add_argument("--solver", required=True)
    p.add_argument("--weights", help="initial weights: .caffemodel or a torchvision VGG16 state dict")
    p.add_argument("--imdb", default="voc_2007_trainval",
                   help="voc_<year>_<set>, coco_<year>_<split> or coco:INSTANCES.json ('+' joins)")
    p.add_argument("--data", "--images", dest="data", metavar="DIR",
                   help="dataset root holding VOCdevkit or coco/ (for coco:FILE: the image folder)")
    p.add_argument("--proposals", metavar="FILE", help="proposals file (.mat, .npz or .json)")
    p.add_argument("--iters", type=int, help="iterations (default: the solver's max_iter)")
    _add_cfg(p)
    p.add_argument("--output", default="output", metavar="DIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--resume", metavar="STATE|auto",
                   help="continue an interrupted run from a .state.safetensors snapshot; auto: the "
                        "newest one of this solver in --output that loads (none: start afresh)")
    p.add_argument("--log-kept-rois", dest="log_kept_rois", metavar="FILE",
                   help="log every OHEM selection (see `inspect`)")
    p.add_argument("--log-every", dest="log_every", type=int, default=1, metavar="K")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard events (losses, lr, speed; OHEM every K iterations)")

    p = sub.add_parser("test", help="detect on an image set and evaluate (the original test_net.py)")
    p.add_argument("--def", dest="def_path", required=True, metavar="TEST_PROTOTXT")
    p.add_argument("--net", dest="net_path", required=True, metavar="MODEL.caffemodel")
    p.add_argument("--imdb", default="voc_2007_test",
                   help="voc_<year>_<set>, coco_<year>_<split> or coco:INSTANCES.json")
    p.add_argument("--data", "--images", dest="data", metavar="DIR",
                   help="dataset root holding VOCdevkit or coco/ (for coco:FILE: the image folder)")
    p.add_argument("--proposals", metavar="FILE")
    _add_cfg(p)
    p.add_argument("--output", default="output", metavar="DIR")
    p.add_argument("--thresh", type=float, default=0.05, help="per-class score threshold")
    p.add_argument("--max-per-image", dest="max_per_image", type=int, default=100)
    p.add_argument("--vis", type=int, default=0, metavar="N", help="draw detections on N images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write mAP and per-class AP as TensorBoard scalars")

    p = sub.add_parser("eval", help="VOC AP of devkit result files, or COCO AP of a results json")
    p.add_argument("voc_dir", metavar="VOC_YEAR_DIR", nargs="?")
    p.add_argument("--imageset", default="test")
    p.add_argument("--dets", required=True, metavar="DIR|RESULTS.json")
    p.add_argument("--coco", metavar="INSTANCES.json",
                   help="evaluate the --dets results json against this COCO json (pycocotools)")
    p.add_argument("--metric", choices=["voc07", "area"], default="voc07")
    p.add_argument("--json", dest="json_path", metavar="FILE")

    p = sub.add_parser("make-minivoc", help="write the built-in mini-VOC (VOCdevkit layout)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=None, help="number of images (default: built-in size)")
    p.add_argument("--format", choices=["voc", "coco"], default="voc",
                   help="coco: also its COCO layout (coco/annotations/instances_<split>2007.json)")

    p = sub.add_parser("voc2coco", help="a VOC image set as a COCO-format json")
    p.add_argument("voc_dir", metavar="VOC_YEAR_DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, metavar="INSTANCES.json")

    p = sub.add_parser("proposals", help="selective-search proposals for a VOC-format dataset (OpenCV)")
    p.add_argument("voc_dir", metavar="VOC_YEAR_DIR")
    p.add_argument("--imageset", default="trainval")
    p.add_argument("--out", required=True, metavar="FILE.mat")
    p.add_argument("--mode", choices=["fast", "quality"], default="fast")

    p = sub.add_parser("inspect", help="which RoIs OHEM kept: pictures and statistics")
    p.add_argument("log", nargs="?", metavar="FILE", help="a --log-kept-rois log")
    p.add_argument("--iter", dest="iteration", type=int)
    p.add_argument("--image", help="image id (with a log) or image file (with --def/--net)")
    p.add_argument("--out", metavar="PNG")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--def", dest="def_path", metavar="TRAIN_PROTOTXT")
    p.add_argument("--net", dest="net_path", metavar="MODEL.caffemodel")
    p.add_argument("--proposals", metavar="FILE")
    _add_cfg(p)
    p.add_argument("--tensorboard", metavar="DIR", help="convert the log FILE to TensorBoard events")

    p = sub.add_parser("demo", help="mini-VOC: train FRCN and OHEM, test both, compare")
    p.add_argument("--output", default="demo_output", metavar="DIR")
    p.add_argument("--iters", type=int, default=None, help="training iterations per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard", metavar="DIR", help="TensorBoard events, DIR/<method>_seed<S>")
    p.add_argument("--detector", choices=["fast-rcnn", "faster-rcnn"], default="fast-rcnn",
                   help="faster-rcnn: Faster R-CNN end-to-end, with and without OHEM")

    p = sub.add_parser("experiment", help="mini-VOC: FRCN vs OHEM and its rivals, paired over seeds")
    p.add_argument("--methods", nargs="+", metavar="M",
                   help="methods to compare (default: all: frcn frcn-bg0 frcn-n1 ohem ohem-nonms "
                        "ratio neg-pos topk-threshold focal)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="training seeds (default: the design's)")
    p.add_argument("--output", default="experiment_output", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 images, 4 iterations")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the design's)")
    p.add_argument("--jobs", type=int, default=None, metavar="J",
                   help="split the seeds over J worker processes of 1 thread each "
                        "(default: 2 where there are 2 CPUs or more; 1: all in this process)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "shapes", None) is not None:
        args.shapes = dict(args.shapes)
    module_name, func_name = COMMANDS[args.command].split(":")
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(**kwargs)
    except OhemError as e:
        print(f"readonly-ohem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written
        where = e.filename if e.filename is not None else ""
        what = e.strerror or str(e)
        print(f"readonly-ohem {args.command}: error: {where}{': ' if where else ''}{what}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"readonly-ohem {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
