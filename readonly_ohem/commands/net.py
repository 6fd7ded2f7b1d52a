"""``readonly-ohem net``: print a net's layer table (as Caffe does at start-up) without running it.

The table and its JSON are ``readonly_ohem.caffe.summary``'s; this module builds the net from the
prototxt (data layers not built: their tops take ``--shape``), loads ``--weights`` if given and
prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping

from readonly_ohem import python_layers  # noqa: F401  (registers RoIDataLayer, OHEMDataLayer)
from readonly_ohem.caffe import use_caffe_float32
from readonly_ohem.caffe.net import Net
from readonly_ohem.caffe.summary import format_table, json_summary, summarize
from readonly_ohem.errors import DataError, SpecError


def net_command(prototxt, phase: str = "TRAIN", shapes: Mapping | None = None, weights=None,
                json_path=None, allow_python_import: bool = False) -> int:
    """Print the layer table of ``prototxt``; ``--json FILE|-`` also writes it as JSON."""
    use_caffe_float32()  # Caffe computes in true float32: no TF32 on GPUs
    shapes = {k: tuple(v) for k, v in dict(shapes or {}).items()}
    net = Net.from_file(prototxt, phase=phase, input_shapes=shapes,
                        allow_python_import=allow_python_import, build_data_layers=False,
                        materialize=bool(weights))
    sources = {t for r in net.layers if r.is_source for t in r.tops}
    unknown = sorted(set(shapes) - sources)
    if unknown:
        raise SpecError(f"{prototxt}: --shape names {', '.join(map(repr, unknown))}, which "
                        "is not a net input or data-layer top "
                        f"(those are: {', '.join(sorted(sources)) or 'none'})")
    report = net.load_caffemodel(weights) if weights else None
    summary = summarize(net)
    to_stdout = json_path == "-"
    if not to_stdout:
        print(format_table(net, summary))
    if report is not None:  # with --json -, stdout holds the JSON alone
        print(str(report), file=sys.stderr if to_stdout else sys.stdout)
    if json_path:
        text = json.dumps(json_summary(summary), indent=1)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            try:
                Path(json_path).write_text(text + "\n")
            except OSError as e:
                raise DataError(f"{json_path}: cannot write the JSON summary "
                                f"({e.strerror or e})") from None
    return 0
