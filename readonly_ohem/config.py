"""The original Fast R-CNN / OHEM configuration: keys, defaults, yml merge and ``--set`` parsing.

The keys and defaults are those of the original ``fast_rcnn/config.py`` (see ``SPEC.md`` §1), so
the original experiment files (``fast_rcnn_ohem.yml``) and ``--set KEY VALUE`` lines work as they
are. Unlike the original there is no mutable global: ``default_config()`` returns a fresh
``Config`` that the caller hands to whatever needs it (the net, the data layer, the trainer).

Deliberate differences, both lenient and harmless: a list where the default is a tuple (or the
reverse) is accepted, and an int where the default is a float is accepted (the original raised).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from readonly_ohem.errors import ConfigError


class Config(dict):
    """A nested dict with attribute access (``cfg.TRAIN.BATCH_SIZE``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no config key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def clone(self) -> "Config":
        return copy.deepcopy(self)

    # -- merging -----------------------------------------------------------------------------
    def merge_dict(self, updates: dict, source: str = "<dict>") -> "Config":
        """Merge ``updates`` (a nested dict, e.g. a parsed yml) into self, with type checks."""
        _merge_into(updates, self, source, prefix="")
        return self

    def merge_file(self, path: str | Path) -> "Config":
        """Merge an original-style ``.yml`` experiment file (``--cfg FILE.yml``)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        try:
            updates = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(updates, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        return self.merge_dict(updates, source=str(path))

    def set_key(self, key: str, value: Any, source: str = "--set") -> "Config":
        """Set one dotted key (``TRAIN.BATCH_SIZE``). Strings are read as Python literals, as the
        original ``cfg_from_list`` does; a string that does not parse stays a string."""
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        parts = key.split(".")
        node = self
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{source}: unknown config key {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"{source}: unknown config key {key!r}")
        node[leaf] = _coerce(value, node[leaf], key, source)
        return self

    def set_list(self, pairs: Iterable[str] | Iterable[tuple[str, Any]], source: str = "--set"):
        """Apply ``[KEY, VALUE, KEY, VALUE, ...]`` or ``[(KEY, VALUE), ...]`` (``--set`` pairs)."""
        pairs = list(pairs)
        if pairs and not isinstance(pairs[0], (tuple, list)):
            if len(pairs) % 2:
                raise ConfigError(f"{source}: expected KEY VALUE pairs, got an odd count")
            pairs = list(zip(pairs[0::2], pairs[1::2]))
        for key, value in pairs:
            self.set_key(key, value, source)
        return self


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Give ``value`` the type of ``default`` where the original would accept it."""
    if isinstance(default, np.ndarray):
        try:
            return np.array(value, dtype=default.dtype)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} must be an array like {default.tolist()}") from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif default is None or type(value) is type(default):
        return value
    elif isinstance(default, dict) and isinstance(value, dict):
        return value
    raise ConfigError(
        f"{source}: {key} must be of type {type(default).__name__} "
        f"(like the default {default!r}), got {value!r}"
    )


def _merge_into(a: dict, b: Config, source: str, prefix: str) -> None:
    for k, v in a.items():
        key = f"{prefix}{k}"
        if k not in b:
            raise ConfigError(f"{source}: unknown config key {key!r}")
        if isinstance(b[k], Config):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {key} must be a mapping of keys")
            _merge_into(v, b[k], source, prefix=f"{key}.")
        else:
            b[k] = _coerce(v, b[k], key, source)


def default_config() -> Config:
    """A fresh config with the original defaults (``fast_rcnn/config.py``)."""
    TRAIN = Config(
        SCALES=(600,),  # shorter image side(s) in training; one is drawn per image
        MAX_SIZE=1000,  # cap on the longer side after scaling
        IMS_PER_BATCH=2,  # images per minibatch (per forward pass)
        BATCH_SIZE=128,  # RoIs per minibatch (plain FRCN sampling; OHEM: hard RoIs kept per pass)
        FG_FRACTION=0.25,  # fraction of the minibatch that is foreground (plain FRCN)
        FG_THRESH=0.5,  # IoU with a gt box for a RoI to be foreground
        BG_THRESH_HI=0.5,  # background RoIs have IoU in [BG_THRESH_LO, BG_THRESH_HI)
        BG_THRESH_LO=0.1,  # the OHEM config sets 0.0: every non-fg RoI is a candidate
        USE_FLIPPED=True,  # append horizontally flipped copies of every image
        BBOX_REG=True,  # train bounding-box regressors
        BBOX_THRESH=0.5,  # RoIs with IoU >= this get regression targets
        SNAPSHOT_ITERS=10000,  # iterations between snapshots
        SNAPSHOT_INFIX="",  # infix in snapshot names: {prefix}{infix}_iter_{n}.caffemodel
        USE_PREFETCH=False,  # the original's prefetch process; we prefetch with DataLoader workers
        BBOX_NORMALIZE_TARGETS=True,  # normalize targets by per-class means and stds
        BBOX_INSIDE_WEIGHTS=(1.0, 1.0, 1.0, 1.0),  # inside weights of fg RoIs' target columns
        BBOX_NORMALIZE_TARGETS_PRECOMPUTED=False,  # use the MEANS/STDS below, not dataset stats
        BBOX_NORMALIZE_MEANS=(0.0, 0.0, 0.0, 0.0),
        BBOX_NORMALIZE_STDS=(0.1, 0.1, 0.2, 0.2),
        PROPOSAL_METHOD="selective_search",  # "gt": train on gt boxes only (Faster R-CNN end-to-end,
        # the RPN makes the RoIs); anything else: gt + the imdb's proposals file
        ASPECT_GROUPING=True,  # pair landscape with landscape, portrait with portrait
        HAS_RPN=False,  # Faster R-CNN end-to-end: the data layer gives data, im_info, gt_boxes
        RPN_POSITIVE_OVERLAP=0.7,  # anchor IoU >= this with a gt box: positive (AnchorTargetLayer)
        RPN_NEGATIVE_OVERLAP=0.3,  # best IoU < this: negative
        RPN_CLOBBER_POSITIVES=False,  # True: an anchor both positive and negative is negative
        RPN_FG_FRACTION=0.5,  # at most this share of RPN_BATCHSIZE anchors is positive
        RPN_BATCHSIZE=256,  # anchors per image that get a label (the rest: -1, ignored)
        RPN_NMS_THRESH=0.7,  # NMS IoU on proposals while training (ProposalLayer, TRAIN phase)
        RPN_PRE_NMS_TOP_N=12000,  # best-scoring proposals kept before NMS (<= 0: all)
        RPN_POST_NMS_TOP_N=2000,  # proposals kept after NMS (<= 0: all)
        RPN_MIN_SIZE=16,  # proposals need both sides >= this, in original-image pixels
        RPN_BBOX_INSIDE_WEIGHTS=(1.0, 1.0, 1.0, 1.0),  # inside weights of positive anchors
        RPN_POSITIVE_WEIGHT=-1.0,  # < 0: every labelled anchor 1/N; p in (0, 1): p/#pos, (1-p)/#neg
        # -- ours, for the RPN layers (rpn/) --
        RPN_GUARD_ZERO_OVERLAP_GT=False,  # True: a gt box with IoU 0 to every inside anchor marks
        # none of them positive (the original makes every inside anchor "best" for it: positive)
        USE_OHEM=False,  # the data layer hands over every RoI; OHEMDataLayer picks the hard ones
        OHEM_USE_NMS=True,  # de-duplicate by NMS (per image and label, loss as score) before top-k
        OHEM_NMS_THRESH=0.7,  # suppress IoU > this (+1 pixel areas), as the GPU NMS kernel does
        # -- ours, Faster R-CNN end-to-end with hard mining (issue 13) --
        OHEM_BATCH_SIZE=0,  # hard RoIs OHEMDataLayer keeps per pass; 0: TRAIN.BATCH_SIZE (Fast
        # R-CNN OHEM). End-to-end OHEM sets BATCH_SIZE -1 (the ProposalTargetLayer passes every
        # RoI, py-R-FCN's convention) and this to 128 (py-R-FCN's roi_per_img)
        RPN_MINING="random",  # which labelled anchors the RPN learns from: "random" (the original:
        # RPN_BATCHSIZE drawn at random), "topk_threshold" (every anchor whose RPN classification
        # loss is >= the RPN_BATCHSIZE-th largest, ties at the cut kept), "topk" (the hardest
        # RPN_BATCHSIZE), "neg_pos" (every positive + the hardest negatives, RPN_NEG_POS_RATIO per
        # positive); unkept anchors get label -1, so the RPN losses average over the kept ones
        RPN_NEG_POS_RATIO=3.0,  # negatives per positive for RPN_MINING "neg_pos"
        # -- bad annotations (issue 16) --
        # a gt box reaching outside its image: "clip" it to the image with a warning naming the
        # XML file and object; "error": refuse the dataset; "keep": train on it as written (the
        # original). A box with no pixel inside the image is an error unless "keep".
        GT_OUTSIDE_IMAGE="clip",
    )
    # -- OHEM readonly-branch precision (ours, not in the original; the default is the original's)
    # "bfloat16" (or "float16") runs the readonly head (roi_pool5_readonly .. cls_prob_readonly)
    # under torch.autocast: much faster on GPUs (no TF32 here), the kept RoIs may differ slightly
    TRAIN.OHEM_READONLY_DTYPE = "float32"
    TEST = Config(
        SCALES=(600,),  # shorter image side(s) at test time
        MAX_SIZE=1000,
        NMS=0.3,  # per-class NMS threshold on detections
        SVM=False,  # (R-CNN SVMs; unused)
        BBOX_REG=True,  # apply the predicted box deltas
        HAS_RPN=False,  # Faster R-CNN: the test net makes its own RoIs (no proposals file)
        # +M with an RPN (not in the original, which asserts one scale with HAS_RPN): with several
        # TEST.SCALES run the net at each and merge the scales' detections (test.im_detect_rpn_multiscale)
        MULTISCALE_RPN=False,
        PROPOSAL_METHOD="selective_search",
        RPN_NMS_THRESH=0.7,  # the ProposalLayer's keys in the TEST phase
        RPN_PRE_NMS_TOP_N=6000,
        RPN_POST_NMS_TOP_N=300,
        RPN_MIN_SIZE=16,
        # +B, the paper's iterative bbox regression and weighted voting (after MR-CNN; not in the
        # released code, off by default; readonly_ohem/detection/iterative.py)
        ITER_BBOX_REG=False,  # R2: re-score and re-regress the R1 boxes, detect on R1 ∪ R2
        ITER_BBOX_REG_THRESH=0.05,  # an R1 box goes to the R2 pass if its class score > this
        BBOX_VOTE=False,  # each box kept by NMS -> score-weighted mean of its candidates' boxes
        BBOX_VOTE_THRESH=0.5,  # candidates with IoU >= this with a kept box vote for it
    )
    return Config(
        TRAIN=TRAIN,
        TEST=TEST,
        DEDUP_BOXES=1.0 / 16.0,  # RoIs equal after rounding(box * this) are scored once at test
        PIXEL_MEANS=np.array([[[102.9801, 115.9465, 122.7717]]]),  # BGR means subtracted
        RNG_SEED=3,
        EPS=1e-14,
        ROOT_DIR=".",
        DATA_DIR="data",
        MODELS_DIR="models",
        MATLAB="matlab",
        EXP_DIR="default",
        USE_GPU_NMS=True,
        GPU_ID=0,
    )


def load_config(cfg_files: Iterable[str | Path] = (), set_pairs: Iterable = (),
                defaults: dict | None = None) -> Config:
    """Defaults, then each ``--cfg`` file in order, then the ``--set`` pairs (as the original tools).

    ``defaults``: a nested dict merged over the original defaults before the files (an entry
    point's own settings, e.g. ``inspect``'s OHEM keys), so files and ``--set`` still win.
    """
    cfg = default_config()
    if defaults:
        cfg.merge_dict(defaults, source="<defaults>")
    for f in cfg_files or ():
        cfg.merge_file(f)
    cfg.set_list(set_pairs or ())
    return cfg
