"""Which RoIs OHEM kept: the kept-RoI log, pictures of one selection, statistics over a run.

- ``log``: ``KeptRoiLogger`` / ``make_recorder`` (the recorder ``train --log-kept-rois`` attaches
  to the OHEM layers) and ``read_log`` (JSON-lines index + npz blobs; see ``docs/inspect.md``).
- ``draw``: ``render_selection`` — one (iteration, image) selection drawn on the image.
- ``stats``: ``selection_stats`` / ``format_stats`` / ``plot_stats`` and ``summarize_selection``.
- ``live``: ``inspect_image`` — run a trained OHEM train net's readonly head once on one image.
- ``inspect_command``: ``readonly-ohem inspect``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from readonly_ohem.errors import ConfigError
from readonly_ohem.inspect.draw import figure_size, render_selection  # noqa: F401
from readonly_ohem.inspect.log import (  # noqa: F401
    KeptRoiLog,
    KeptRoiLogger,
    find_record,
    make_recorder,
    read_log,
)
from readonly_ohem.inspect.stats import (  # noqa: F401
    format_stats,
    plot_stats,
    selection_stats,
    summarize_selection,
)


def draw_logged(log, out, iteration=None, image=None):
    """Picture of one logged selection (default: the last iteration's first image) -> (path, record)."""
    log = log if isinstance(log, KeptRoiLog) else read_log(log)
    rec = find_record(log, iteration, image)
    if out is None:
        out = Path(f"kept_rois_iter{rec.meta['iter']}_{rec.meta['image_id']}.png")
    render_selection(rec.meta, rec.arrays, log.classes, out)
    return Path(out), rec


def inspect_command(log=None, iteration=None, image=None, out=None, stats=False, def_path=None,
                    net_path=None, proposals=None, cfg=(), set_pairs=(), stream=None) -> int:
    """``readonly-ohem inspect``: a picture of a logged selection, the statistics of a log, or
    (``--def/--net/--image``) the selection a trained net would make now on one image."""
    stream = stream if stream is not None else sys.stdout
    if def_path or net_path:
        if not (def_path and net_path and image):
            raise ConfigError("inspect on a model needs --def TRAIN_PROTOTXT, --net MODEL.caffemodel "
                              "and --image IMG.jpg")
        if log:
            raise ConfigError("give either a log FILE or --def/--net, not both")
        from readonly_ohem.inspect.live import inspect_image

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
