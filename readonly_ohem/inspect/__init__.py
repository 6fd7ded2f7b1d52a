"""Which RoIs OHEM kept: the kept-RoI log, pictures of one selection, statistics over a run.

- ``log``: ``KeptRoiLogger`` / ``make_recorder`` (the recorder ``train --log-kept-rois`` attaches
  to the OHEM layers) and ``read_log`` (JSON-lines index + npz blobs; see ``docs/inspect.md``).
- ``draw``: ``render_selection`` — one (iteration, image) selection drawn on the image.
- ``stats``: ``selection_stats`` / ``format_stats`` / ``plot_stats`` and ``summarize_selection``;
  ``iteration_stats``, the numbers of one logged iteration (also what TensorBoard gets).
- ``live``: ``inspect_image`` — run a trained OHEM train net's readonly head once on one image.
- ``draw_logged``: the picture of one logged selection.

``readonly-ohem inspect`` is ``readonly_ohem.commands.inspect``.
"""

from __future__ import annotations

from pathlib import Path

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
    iteration_stats,
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
