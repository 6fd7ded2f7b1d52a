"""``readonly-ohem inspect``: which RoIs OHEM kept (``readonly_ohem.inspect``).

Three forms: ``inspect LOG [--iter N] [--image ID] [--out PNG]`` draws one logged selection;
``inspect LOG --stats [--out PNG]`` prints (and plots) the statistics of a whole log;
``inspect --def TRAIN_PROTOTXT --net MODEL --image IMG`` draws the selection a trained net would
make now on one image (``readonly_ohem.inspect.live``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect import draw_logged, read_log, summarize_selection
from readonly_ohem.inspect.live import inspect_image
from readonly_ohem.tensorboard import write_log


def inspect_command(log=None, iteration=None, image=None, out=None, stats=False, def_path=None,
                    net_path=None, proposals=None, cfg=(), set_pairs=(), tensorboard=None,
                    stream=None) -> int:
    """``readonly-ohem inspect``: a picture of a logged selection, the statistics of a log, or
    (``--def/--net/--image``) the selection a trained net would make now on one image."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    stream = stream if stream is not None else sys.stdout
    if def_path or net_path:
        if not (def_path and net_path and image):
            raise ConfigError("inspect on a model needs --def TRAIN_PROTOTXT, --net MODEL.caffemodel "
                              "and --image IMG.jpg")
        if log:
            raise ConfigError("give either a log FILE or --def/--net, not both")
        if tensorboard:
            raise ConfigError("--tensorboard converts a log FILE; it does not go with --def/--net")
        out = out or f"{Path(image).stem}_ohem.png"
        result = inspect_image(def_path, net_path, image, proposals=proposals, cfg_files=cfg,
                               set_pairs=set_pairs, out=out)
        print(result["summary"], file=stream)
        print(f"wrote {out}", file=stream)
        return 0
    if not log:
        raise ConfigError("inspect needs a log FILE (written by train --log-kept-rois), or "
                          "--def/--net/--image for a trained model")
    data = read_log(log)
    if data.skipped:
        print(f"{log}: skipped {data.skipped} torn or incomplete record(s)", file=stream)
    if tensorboard:
        written = write_log(data, tensorboard)
        print(f"wrote {written['iterations']} logged iteration(s) to {tensorboard} "
              f"(open with: tensorboard --logdir {tensorboard})", file=stream)
        return 0
    if stats:
        summarize_selection(data, stream=stream, plot=out)
        if out:
            print(f"wrote {out}", file=stream)
        return 0
    path, rec = draw_logged(data, out, iteration, image)
    m = rec.meta
    print(f"iteration {m['iter']} pass {m['pass']} image {m['image_id']}: kept {m['num_kept']} of "
          f"{m['num_rois']} RoIs ({m['num_kept_fg']} fg), NMS suppressed {m['num_suppressed']}",
          file=stream)
    print(f"wrote {path}", file=stream)
    return 0
