"""RoIDataLayer: the Python data layer of the Fast R-CNN / OHEM train nets (``roi_data_layer/layer.py``).

``param_str: "'num_classes': 21"``; tops in prototxt order: data, rois, labels and, with
``TRAIN.BBOX_REG``, bbox_targets, bbox_inside_weights, bbox_outside_weights. With
``TRAIN.HAS_RPN`` (Faster R-CNN end-to-end) the tops are data, im_info, gt_boxes instead
(``minibatch.rpn_blobs``; one image per minibatch). ``set_roidb(roidb)`` must be called before
the first forward (as the original's solver wrapper does).

Order: a permutation of the roidb per pass (``TRAIN.ASPECT_GROUPING`` pairs landscape with
landscape and portrait with portrait), reshuffled when ``cur + IMS_PER_BATCH >= len(roidb)`` (so
the last images of a pass are skipped, as the original). Every random draw comes from one
``np.random.RandomState(RNG_SEED)`` in the main process, in the original's order (permutation,
scale index, fg/bg choices), so the order and content are the same with or without prefetch and
for any number of workers. Prefetch: torch DataLoader workers read and resize the images of the
already planned minibatches. ``data_order_state()`` / ``load_data_order_state(state)`` save and
restore the order, cursor and random state at the next minibatch to be consumed (for resuming;
JSON-friendly); ``state_dict()`` is nn.Module's.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

from readonly_ohem.caffe.layers.base import Layer, register_python
from readonly_ohem.caffe.layers.python import parse_param_str
from readonly_ohem.config import default_config
from readonly_ohem.errors import DataError
from readonly_ohem.roi_data.minibatch import build_minibatch, plan_minibatch

TOP_NAMES = ("data", "rois", "labels", "bbox_targets", "bbox_inside_weights", "bbox_outside_weights")
RPN_TOP_NAMES = ("data", "im_info", "gt_boxes")  # TRAIN.HAS_RPN


class MinibatchPlanner:
    """The layer's order and random state: yields planned minibatches (db_inds + random choices)."""

    def __init__(self, roidb: list[dict], cfg, seed: int | None = None):
        self.roidb, self.cfg = roidb, cfg
        self.rng = np.random.RandomState(cfg.RNG_SEED if seed is None else seed)
        self.perm = np.arange(len(roidb))
        self.cur = 0
        self.shuffle()

    def shuffle(self) -> None:
        """The original ``_shuffle_roidb_inds`` (an odd leftover of the aspect pairs goes last)."""
        if self.cfg.TRAIN.ASPECT_GROUPING:
            w = np.array([r["width"] for r in self.roidb])
            h = np.array([r["height"] for r in self.roidb])
            horz = w >= h
            inds = np.hstack((self.rng.permutation(np.where(horz)[0]),
                              self.rng.permutation(np.where(~horz)[0])))
            n2 = inds.size // 2 * 2
            pairs = inds[:n2].reshape(-1, 2)
            pairs = pairs[self.rng.permutation(np.arange(pairs.shape[0]))]
            self.perm = np.concatenate([pairs.reshape(-1), inds[n2:]])
        else:
            self.perm = self.rng.permutation(np.arange(len(self.roidb)))
        self.cur = 0

    def next_inds(self) -> np.ndarray:
        n = self.cfg.TRAIN.IMS_PER_BATCH
        if self.cur + n >= len(self.roidb):
            self.shuffle()
        inds = self.perm[self.cur: self.cur + n]
        self.cur += n
        return inds

    def next_plan(self) -> dict:
        state = self.data_order_state()
        inds = self.next_inds()
        plan = plan_minibatch([self.roidb[i] for i in inds], self.cfg, self.rng)
        plan.update(db_inds=inds, state=state)
        return plan

    def data_order_state(self) -> dict:
        """``{perm, cur, rng: {name, keys, pos, has_gauss, cached_gaussian}}`` (JSON-friendly)."""
        name, keys, pos, has_gauss, gauss = self.rng.get_state()
        return dict(perm=self.perm.tolist(), cur=int(self.cur),
                    rng=dict(name=name, keys=keys.tolist(), pos=int(pos), has_gauss=int(has_gauss),
                             cached_gaussian=float(gauss)))

    def load_data_order_state(self, state: dict) -> None:
        """Continue from a ``data_order_state()`` of a planner over the same roidb."""
        perm = np.asarray(state["perm"], dtype=np.int64)
        if perm.size and (perm.max() >= len(self.roidb) or perm.size != len(self.roidb)):
            raise DataError(f"data layer state is for a roidb of {perm.size} images, this one has "
                            f"{len(self.roidb)}")
        r = state["rng"]
        self.rng.set_state((r["name"], np.asarray(r["keys"], dtype=np.uint32), r["pos"],
                            r["has_gauss"], r["cached_gaussian"]))
        self.perm, self.cur = perm, int(state["cur"])


class _PlannedMinibatches(torch.utils.data.Dataset):
    """Map-style dataset whose "indices" are plans: workers build the blobs of a plan."""

    def __init__(self, roidb, num_classes, cfg):
        self.roidb, self.num_classes, self.cfg = roidb, num_classes, cfg

    def __getitem__(self, plan):
        return build_minibatch([self.roidb[i] for i in plan["db_inds"]], plan, self.num_classes, self.cfg)

    def __len__(self):  # unused: the sampler is endless
        return 1 << 62


class _PlanSampler(torch.utils.data.Sampler):
    """Iterated by the DataLoader in the main process: plans in order, remembered until consumed."""

    def __init__(self, planner: MinibatchPlanner, pending: collections.deque):
        self.planner, self.pending = planner, pending

    def __iter__(self):
        while True:
            plan = self.planner.next_plan()
            self.pending.append(plan)
            yield plan


def _identity(x):
    return x


@register_python("roi_data_layer.layer", "RoIDataLayer")
class RoIDataLayer(Layer):
    backprop_to_bottoms = False
    min_bottoms, max_bottoms = 0, 0
    min_tops, max_tops = 1, 6

    def __init__(self, param, ctx):
        super().__init__(param, ctx)
        self.cfg = ctx.cfg if ctx.cfg is not None else default_config()
        try:
            self.num_classes = int(parse_param_str(param)["num_classes"])
        except (KeyError, TypeError, ValueError):
            raise self.error(f"param_str must give num_classes (e.g. \"'num_classes': 21\"), "
                             f"got {param.python_param.param_str!r}") from None
        if self.cfg.TRAIN.HAS_RPN:
            if len(param.top) != 3:
                raise self.error(f"with TRAIN.HAS_RPN the tops are {', '.join(RPN_TOP_NAMES)} (3), "
                                 f"the spec names {len(param.top)}")
            if self.cfg.TRAIN.IMS_PER_BATCH != 1:
                raise self.error(f"with TRAIN.HAS_RPN the RPN layers take one image per minibatch: "
                                 f"set TRAIN.IMS_PER_BATCH 1 (it is {self.cfg.TRAIN.IMS_PER_BATCH})")
        else:
            want = 6 if self.cfg.TRAIN.BBOX_REG else 3
            if len(param.top) != want:
                raise self.error(f"with TRAIN.BBOX_REG {self.cfg.TRAIN.BBOX_REG} the tops are "
                                 f"{', '.join(TOP_NAMES[:want])} ({want}), the spec names {len(param.top)}")
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)
        self.roidb = None
        self.planner = None
        self.num_workers = 0
        self._loader_iter = None
        self._pending: collections.deque = collections.deque()
        self.last_plan = None

    # -- roidb and prefetch ---------------------------------------------------------------------
    def set_roidb(self, roidb: list[dict], prefetch: bool | None = None, num_workers: int = 2,
                  seed: int | None = None, pin_memory: bool = False) -> None:
        """Use ``roidb`` (the filtered training roidb with bbox_targets); shuffle with ``RNG_SEED``.

        ``prefetch`` (default ``TRAIN.USE_PREFETCH``): read images in ``num_workers`` DataLoader
        workers ahead of time; the minibatches are the same either way.
        """
        if not roidb:
            raise DataError(f"layer {self.name!r}: set_roidb got an empty roidb")
        if self.cfg.TRAIN.BBOX_REG and not self.cfg.TRAIN.HAS_RPN and "bbox_targets" not in roidb[0]:
            raise DataError(f"layer {self.name!r}: the roidb has no bbox_targets "
                            f"(run add_bbox_regression_targets, or set TRAIN.BBOX_REG False)")
        self.close()
        self.roidb = roidb
        self.planner = MinibatchPlanner(roidb, self.cfg, seed)
        prefetch = self.cfg.TRAIN.USE_PREFETCH if prefetch is None else prefetch
        self.num_workers = max(0, int(num_workers)) if prefetch else 0
        self.pin_memory = pin_memory
        self._dataset = _PlannedMinibatches(roidb, self.num_classes, self.cfg)

    def _start_loader(self):
        self._pending.clear()
        loader = torch.utils.data.DataLoader(
            self._dataset, batch_size=None, sampler=_PlanSampler(self.planner, self._pending),
            num_workers=self.num_workers, collate_fn=_identity, pin_memory=self.pin_memory,
            prefetch_factor=2, persistent_workers=False)
        self._loader_iter = iter(loader)

    def close(self) -> None:
        """Stop prefetch workers (they restart on the next forward)."""
        if self._loader_iter is not None and self._pending:
            # the planner ran ahead: rewind it to the first plan not yet consumed
            self.planner.load_data_order_state(self._pending[0]["state"])
        self._loader_iter = None
        self._pending.clear()

    def next_minibatch(self) -> dict[str, torch.Tensor]:
        """The blobs of the next minibatch (CPU tensors); ``last_plan`` says which images/RoIs."""
        if self.planner is None:
            raise DataError(f"layer {self.name!r}: call set_roidb(roidb) before the first forward")
        if self.num_workers == 0:
            plan = self.planner.next_plan()
            blobs = self._dataset[plan]
        else:
            if self._loader_iter is None:
                self._start_loader()
            blobs = next(self._loader_iter)
            plan = self._pending.popleft()
        self.last_plan = plan
        return blobs

    # -- state for resume ---------------------------------------------------------------------
    def data_order_state(self) -> dict:
        """Order, cursor and random state at the next minibatch to be consumed (JSON-friendly;
        ``{}`` before ``set_roidb``)."""
        if self.planner is None:
            return {}
        if self._pending:
            return self._pending[0]["state"]
        return self.planner.data_order_state()

    def load_data_order_state(self, state: dict) -> None:
        """Continue from a ``data_order_state()`` (an empty one changes nothing)."""
        if not state:
            return
        if self.planner is None:
            raise DataError(f"layer {self.name!r}: call set_roidb before load_data_order_state")
        self.close()
        self.planner.load_data_order_state(state)

    # -- layer contract -------------------------------------------------------------------------
    @property
    def top_names(self) -> tuple[str, ...]:
        """The blobs this layer's tops carry, in order."""
        names = RPN_TOP_NAMES if self.cfg.TRAIN.HAS_RPN else TOP_NAMES
        return names[: len(self.param.top)]

    def forward(self, bottoms, params):
        blobs = self.next_minibatch()
        dev = self._device_marker.device
        return [blobs[n].to(dev, non_blocking=True) for n in self.top_names]

    def top_shapes(self, bottom_shapes):
        """The original's setup shapes (the real ones are known after a forward)."""
        t = self.cfg.TRAIN
        data = (t.IMS_PER_BATCH, 3, max(t.SCALES), t.MAX_SIZE)
        if t.HAS_RPN:
            return [data, (1, 3), (1, 4)]
        shapes = [data, (1, 5), (1,)] + [(1, 4 * self.num_classes)] * 3
        return shapes[: len(self.param.top)]
