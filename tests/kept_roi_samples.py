"""Hand-built OHEM selections (the ``hand_log`` fixture in conftest.py logs two iterations of them),
for the tests of ``readonly_ohem.inspect`` and of the ``inspect`` command."""

import torch

from readonly_ohem.ohem.record import SelectionRecord


def record(loss_cls, loss_bbox, labels, suppressed, keep, batch_size, image=None, boxes=None):
    """A SelectionRecord as the OHEM layer hands it over (torch tensors)."""
    n = len(labels)
    lc = torch.tensor(loss_cls, dtype=torch.float64)
    lb = torch.tensor(loss_bbox, dtype=torch.float64)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.tensor(keep, dtype=torch.long)] = True
    if boxes is None:
        boxes = [[10.0 * i, 5.0 * i, 10.0 * i + 40, 5.0 * i + 30] for i in range(n)]
    return SelectionRecord(
        keep=torch.tensor(keep, dtype=torch.long), loss_cls=lc, loss_bbox=lb, loss=lc + lb,
        labels=torch.tensor(labels, dtype=torch.long),
        image=torch.tensor(image if image is not None else [0] * n, dtype=torch.long),
        boxes=torch.tensor(boxes, dtype=torch.float32), suppressed=torch.tensor(suppressed),
        kept=kept, batch_size=batch_size)


# iteration 0: losses 4, 3, 2, 1, 0.5; RoI 1 (loss 3) suppressed although harder than the easiest
# kept (2); batch 2 is full.  iteration 1: losses 1, 2, 0.25, 0.125; RoI 3 suppressed, easier than
# every kept one, but only 3 RoIs survived for a batch of 4: NMS cost the batch a RoI.
REC0 = dict(loss_cls=[3.5, 3.0, 2.0, 0.75, 0.5], loss_bbox=[0.5, 0, 0, 0.25, 0], labels=[1, 0, 0, 2, 0],
            suppressed=[False, True, False, False, False], keep=[0, 2], batch_size=2)
REC1 = dict(loss_cls=[1.0, 1.5, 0.25, 0.125], loss_bbox=[0, 0.5, 0, 0], labels=[0, 3, 0, 0],
            suppressed=[False, False, False, True], keep=[1, 0, 2], batch_size=4)
META = dict(image_id="000007", image_path=None, flipped=False, width=120, height=90, scale=2.0)
