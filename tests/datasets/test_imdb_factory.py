"""The imdb protocol, the dataset factory's registry and the roidb cache keyed through the protocol."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from readonly_ohem.datasets import cache, factory, get_imdb, register_dataset, registered_datasets, voc_eval
from readonly_ohem.datasets.imdb import CombinedImdb, Imdb, overlaps_matrix
from readonly_ohem.errors import DataError

CLASSES = ("__background__", "cat", "dog")


class ToyImdb(Imdb):
    """``toy_<n>``: n grey images with one gt box each and three proposals, all files in one dir."""

    def __init__(self, n, root, cache_dir=None):
        self.name, self.classes, self.cache_dir, self.root = f"toy_{n}", CLASSES, cache_dir, root
        self.image_index = [f"{i:03d}" for i in range(n)]
        root.mkdir(parents=True, exist_ok=True)
        for i in self.image_index:
            if not (root / f"{i}.png").exists():
                Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / f"{i}.png")

    def image_path_at(self, i):
        return str(self.root / f"{self.image_index[i]}.png")

    def has_gt(self):
        return True

    def gt_roidb(self):
        return [dict(boxes=np.array([[2.0, 2, 20, 20]]), gt_classes=np.array([1 + i % 2], np.int32),
                     gt_overlaps=overlaps_matrix([1 + i % 2], [1.0], 3), flipped=False)
                for i in range(self.num_images)]

    def proposal_boxes(self, i):
        return np.array([[2.0, 2, 20, 20], [2, 2, 10, 20], [25, 10, 35, 25]])

    def cache_inputs(self):
        return dict(name=self.name, root=str(self.root)), [self.image_path_at(i) for i in range(self.num_images)]

    def annotations_at(self, i):
        raise DataError(f"{self.root}/{self.image_index[i]}.xml: annotation file not found")

    def evaluate_detections(self, all_boxes, output_dir):
        return voc_eval.evaluate_detections(self, all_boxes, output_dir)


@pytest.fixture
def toy_family(tmp_path):
    form = "toy_<n>"
    register_dataset(r"toy_(\d+)", lambda m, data_dir, proposals, cfg, cache_dir:
                     ToyImdb(int(m.group(1)), tmp_path / "images", cache_dir), form=form, example="toy_3")
    yield tmp_path
    factory._FAMILIES.pop(form)


def test_unknown_name_lists_the_registered_families(toy_family):
    assert registered_datasets() == ["voc_<year>_<image_set>", "coco_<year>_<split>",
                                     "coco:<instances.json>", "toy_<n>"]
    with pytest.raises(DataError, match=r"unknown imdb 'kitti_2012_train' \(expected voc_<year>_<image_set>, "
                                        r"e.g. voc_2007_trainval; or coco_<year>_<split>, e.g. coco_2014_train; "
                                        r"or coco:<instances.json>, e.g. coco:annotations/instances_val2017.json; "
                                        r"or toy_<n>, e.g. toy_3\)"):
        get_imdb("kitti_2012_train")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(r"toy_(\d+)", lambda *a: None, form="toy_<n>", example="toy_3")


def test_a_registered_family_by_name_and_in_combinations(toy_family):
    imdb = get_imdb("toy_3", cache_dir=False)
    assert isinstance(imdb, ToyImdb) and imdb.num_images == 3 and imdb.num_classes == 3
    assert imdb.parts == [imdb]
    np.testing.assert_array_equal(imdb.image_sizes, [[40, 30]] * 3)
    e = imdb.roidb[1]
    assert e["gt_classes"].tolist() == [2, 0, 0, 0] and e["image_id"] == "001"
    np.testing.assert_allclose(e["gt_overlaps"].toarray()[:, 2], [1, 1, 9 * 19 / (19 * 19), 0], rtol=1e-6)  # +1 widths
    both = get_imdb("toy_2+toy_3", cache_dir=False)
    assert isinstance(both, CombinedImdb) and both.name == "toy_2+toy_3" and both.num_images == 5
    assert [p.name for p in both.parts] == ["toy_2", "toy_3"]
    assert [e["image_id"] for e in both.roidb] == ["000", "001", "000", "001", "002"]
    assert both.image_sizes.shape == (5, 2) and both.has_gt()


def test_cache_is_keyed_through_the_protocol(toy_family):
    cdir = toy_family / "cache"
    a = get_imdb("toy_3", cache_dir=cdir).roidb
    (npz,) = cdir.glob("toy_3_*_roidb.npz")
    with np.load(npz, allow_pickle=False) as z:  # plain arrays only
        assert set(z.files) == {"boxes", "gt_classes", "overlaps_data", "overlaps_indices", "overlaps_indptr"}
    assert json.loads(npz.with_suffix(".json").read_text())["counts"] == [4, 4, 4]
    b = cache.load(get_imdb("toy_3", cache_dir=cdir))
    assert b is not None
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["gt_overlaps"].toarray(), y["gt_overlaps"].toarray())
        assert y["gt_overlaps"].dtype == np.float32 and y["gt_overlaps"].format == "csr"
        assert {k: x[k] for k in ("image", "image_id", "width", "height", "flipped")} == \
            {k: y[k] for k in ("image", "image_id", "width", "height", "flipped")}
    # a listed file changes: stale
    png = toy_family / "images" / "002.png"
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.load(get_imdb("toy_3", cache_dir=cdir)) is None
    # another description (here: another root) is another cache file
    other = ToyImdb(3, toy_family / "elsewhere", cache_dir=cdir)
    _ = other.roidb
    assert len(list(cdir.glob("toy_3_*_roidb.npz"))) == 2


def test_evaluation_without_annotations_is_reported(toy_family):
    imdb = get_imdb("toy_2", cache_dir=False)
    boxes = [[np.zeros((0, 5), np.float32)] * 2 for _ in CLASSES]
    boxes[1][0] = np.array([[2, 2, 20, 20, 0.9]], np.float32)
    r = imdb.evaluate_detections(boxes, toy_family / "out")
    assert r["eval"] is None and r["report"] == \
        f"not evaluated (no annotations): {toy_family / 'images'}/000.xml: annotation file not found"
    assert sorted(r["result_files"]) == ["cat", "dog"]
    assert r["results_at"] == f"{toy_family / 'out'}/comp4_det_test_<class>.txt"
    assert (toy_family / "out" / "comp4_det_test_cat.txt").read_text() == "000 0.900 3.0 3.0 21.0 21.0\n"


def test_voc_cache_invalidated_by_proposals_and_image_set(fixtures_dir, tmp_path):
    src = fixtures_dir / "original_pipeline" / "train"
    shutil.copytree(src / "VOCdevkit", tmp_path / "VOCdevkit")
    mat = shutil.copy(src / "voc_2007_trainval.mat", tmp_path / "p.mat")
    cdir = tmp_path / "c"

    def imdb():
        return get_imdb("voc_2007_trainval", tmp_path, proposals=mat, cache_dir=cdir)

    _ = imdb().roidb
    assert cache.load(imdb()) is not None
    for f in (tmp_path / "p.mat", tmp_path / "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert cache.load(imdb()) is None
        _ = imdb().roidb  # rebuilt and cached again
        assert cache.load(imdb()) is not None
    assert len(list(cdir.glob("*.npz"))) == 1  # one file per imdb, rewritten
