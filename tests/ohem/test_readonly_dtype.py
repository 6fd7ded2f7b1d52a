"""TRAIN.OHEM_READONLY_DTYPE: which layers form the readonly branch, and bfloat16 scores that keep
(almost) the RoIs float32 keeps, on a trained model's real outputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from readonly_ohem import python_layers  # noqa: F401  (registers the Python layers)
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.config import load_config
from readonly_ohem.datasets import get_imdb
from readonly_ohem.errors import ConfigError
from readonly_ohem.ohem.readonly import apply_readonly_dtype, readonly_branch
from readonly_ohem.roi_data.minibatch import get_allrois_minibatch
from readonly_ohem.roi_data.roidb import training_roidb

from test_ohem_layer import make_layer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "original_test"  # a trained TinyFastRCNN and 4 VOC images
OHEM_CFG = REPO / "prototxt" / "cfgs" / "fast_rcnn_ohem.yml"
R = 10
SHAPES = {"data": (1, 3, 64, 64), "rois": (R, 5), "labels": (R,), "bbox_targets": (R, 84),
          "bbox_inside_weights": (R, 84), "bbox_outside_weights": (R, 84)}
HEAD = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "cls_score", "bbox_pred"]


def ohem_net(model, dtype="float32"):
    cfg = load_config([OHEM_CFG], [["TRAIN.OHEM_READONLY_DTYPE", repr(dtype)]])
    path = REPO / "prototxt" / model / "fast_rcnn_ohem" / "train.prototxt"
    return Net.from_file(path, cfg=cfg, input_shapes=SHAPES, build_data_layers=False,
                         materialize=False), cfg


@pytest.mark.parametrize("model,pool", [("VGG16", "roi_pool5"), ("small", "roi_pool3")])
def test_the_readonly_branch_is_found_from_the_graph(model, pool):
    net, cfg = ohem_net(model)
    want = [f"{pool}_readonly"] + [f"{n}_readonly" for n in HEAD] + ["cls_prob_readonly"]
    assert sorted(readonly_branch(net)) == sorted(want)
    assert apply_readonly_dtype(net, cfg) == []  # float32: nothing runs under autocast
    plain = Net.from_file(REPO / "prototxt" / model / "fast_rcnn" / "train.prototxt",
                          input_shapes=SHAPES, build_data_layers=False, materialize=False)
    assert readonly_branch(plain) == []


def test_a_dtype_that_is_not_float32_bfloat16_or_float16_is_refused():
    net, cfg = ohem_net("small", "int8")
    with pytest.raises(ConfigError, match="TRAIN.OHEM_READONLY_DTYPE .*'int8'"):
        apply_readonly_dtype(net, cfg)


def test_bfloat16_readonly_branch_in_the_ohem_train_net():
    """The small OHEM net with its readonly branch in bfloat16: the branch's blobs are float32
    with bfloat16's rounding, the rest of the net is untouched, and the layer keeps its RoIs."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (R, 2))
    rois = np.concatenate((np.zeros((R, 1)), xy, xy + rng.uniform(8, 24, (R, 2))), 1)
    feed = {"data": torch.from_numpy(rng.normal(0, 50, SHAPES["data"]).astype(np.float32)),
            "rois": torch.from_numpy(rois.astype(np.float32)),
            "labels": torch.zeros(R), "bbox_targets": torch.zeros(R, 84),
            "bbox_inside_weights": torch.zeros(R, 84), "bbox_outside_weights": torch.zeros(R, 84)}
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config([OHEM_CFG, REPO / "prototxt" / "cfgs" / "small.yml"],
                          [["TRAIN.OHEM_READONLY_DTYPE", repr(dtype)], ["TRAIN.BATCH_SIZE", "4"]])
        path = REPO / "prototxt" / "small" / "fast_rcnn_ohem" / "train.prototxt"
        torch.manual_seed(0)  # the same fillers and dropout masks: the runs differ in precision
        net = Net.from_file(path, phase="TRAIN", cfg=cfg, input_shapes=SHAPES,
                            build_data_layers=False)
        apply_readonly_dtype(net, cfg)
        with torch.no_grad():
            out[dtype] = net.forward(feed)
    a, b = out["float32"], out["bfloat16"]
    assert b["fc7_readonly"].dtype == torch.float32 and b["rois_hard"].shape == (4, 5)
    assert not torch.equal(a["fc7_readonly"], b["fc7_readonly"])  # bfloat16 did run
    torch.testing.assert_close(b["fc7_readonly"], a["fc7_readonly"], rtol=0.05, atol=0.05)
    assert torch.equal(a["conv1"], b["conv1"])  # the trunk stays float32


class Records(list):
    """A recorder that asks for no full NMS (the layer's fast path) and keeps the records."""

    active = False

    def __call__(self, record):
        self.append(record)


def dense_proposals(imdb, per_image, rng):
    """~``per_image`` proposals per image (selective search gives ~2000): the fixture's own and
    gt boxes, jittered in position and scale, clipped to the image; keyed by image id."""
    out = {}
    for i, image_id in enumerate(imdb.image_index):
        w, h = imdb.image_sizes[i]
        seeds = np.concatenate([imdb.proposal_boxes(i), imdb.gt_roidb()[i]["boxes"]])
        src = seeds[rng.integers(0, len(seeds), per_image)].astype(np.float64)
        size = np.concatenate([src[:, 2:] - src[:, :2] + 1] * 2, 1)
        boxes = src + rng.normal(0, 0.15, (per_image, 4)) * size
        boxes = np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 4)
        out[image_id] = np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1])
    return out


def tiny_trunk_and_head():
    """The trained TinyFastRCNN split after its ROIPooling layer: (trunk net with the RoI pooling,
    head net, the pooled blob between them). RoI pooling has no matrix product, so autocast
    leaves it float32 either way: it runs once per image, the head twice."""
    spec = text_format.Parse((TINY / "test.prototxt").read_text(), caffe_pb2.NetParameter())
    cut = [layer.type for layer in spec.layer].index("ROIPooling") + 1
    pooled = spec.layer[cut - 1].top[0]
    trunk, head = caffe_pb2.NetParameter(), caffe_pb2.NetParameter()
    trunk.CopyFrom(spec)
    del trunk.layer[cut:]
    head.input.append(pooled)
    head.input_shape.add().dim.extend((1, 32, 3, 3))
    head.layer.extend(spec.layer[cut:])
    nets = Net(trunk, phase="TEST"), Net(head, phase="TEST")
    for net in nets:
        net.load_caffemodel(TINY / "model.caffemodel")
    return nets[0], nets[1], pooled


def test_bfloat16_keeps_95_percent_of_the_float32_hard_rois_of_a_trained_model(tmp_path):
    """The trained TinyFastRCNN's RoI head (what a readonly branch holds) on two of the fixture's
    VOC images with ~2000 RoIs each (the fixture's proposals jittered), labels and targets as the
    OHEM minibatch makes them: the 64 hard RoIs (NMS on) chosen from bfloat16 scores against
    those from float32 scores."""
    cfg = load_config([OHEM_CFG], [["TRAIN.USE_FLIPPED", "False"]])
    base = get_imdb("voc_2007_test", TINY, TINY / "voc_2007_test.mat", cfg, cache_dir=False)
    np.savez(tmp_path / "props.npz", **dense_proposals(base, 2000, np.random.default_rng(0)))
    imdb = get_imdb("voc_2007_test", TINY, tmp_path / "props.npz", cfg, cache_dir=False)
    roidb, _, _ = training_roidb(imdb, cfg, verbose=False)
    trunk, head, pooled = tiny_trunk_and_head()
    layer = make_layer(cfg)
    layer.recorder = Records()
    same = total = 0
    for entry in roidb[:2]:  # (RoI pooling 2000 RoIs on a CPU takes seconds)
        mb = get_allrois_minibatch([entry], imdb.num_classes, cfg)
        assert mb["rois"].shape[0] > 1500
        with torch.no_grad():
            feed = {pooled: trunk.forward({"data": mb["data"], "rois": mb["rois"]})[pooled]}
        kept, scores = [], []
        for dtype in (None, torch.bfloat16):
            head.set_compute_dtype([rec.name for rec in head.layers if rec.module], dtype)
            with torch.no_grad():
                blobs = head.forward(feed)
            bottoms = [blobs["cls_prob"], blobs["bbox_pred"], mb["rois"], mb["labels"],
                       mb["bbox_targets"], mb["bbox_inside_weights"], mb["bbox_outside_weights"]]
            layer.forward(bottoms, [])
            kept.append(set(layer.recorder[-1].keep.tolist()))
            scores.append(blobs["cls_prob"])
        assert not torch.equal(*scores)  # bfloat16 did change the scores
        assert len(kept[0]) == len(kept[1]) == 64
        same += len(kept[0] & kept[1])
        total += 64
    assert same >= 0.95 * total, (same, total)
