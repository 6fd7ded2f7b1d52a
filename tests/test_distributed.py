"""Data-parallel SGD with 2 gloo processes on CPU: replicas stay identical, and the update equals
a single-process update with the averaged gradient."""

import os
import socket
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from google.protobuf import text_format

from readonly_ohem.caffe.proto import caffe_pb2
from readonly_ohem.train_state import read_state

SOLVER = 'lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 2 momentum: 0.9 weight_decay: 0.01 ' \
         'iter_size: 2'
LP = namedtuple("LP", "key tensor lr_mult decay_mult owner index")
ITERS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int, it: int, p: int):
    """Each replica's own (x, y) for iteration it, pass p."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * it + p)
    return torch.randn(5, 3, generator=g), torch.randn(5, generator=g)


class LinearNet:
    """loss = mean((x·w + b − y)²): enough of the Net API for the solver."""

    loss_weights = {"loss": 1.0}

    def __init__(self):
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
        self.b = torch.nn.Parameter(torch.tensor([0.1]))
        self.frozen = torch.nn.Parameter(torch.tensor([2.0]), requires_grad=False)

    def learnable_params(self):
        return [LP("w", self.w, 1.0, 1.0, "fc", 0), LP("b", self.b, 2.0, 0.0, "fc", 1),
                LP("frozen", self.frozen, 0.0, 1.0, "fc0", 0)]

    def forward(self, feed):
        x, y = feed
        return {"loss": ((x @ self.w + self.b - y) ** 2).mean()}

    def total_loss(self, blobs):
        return blobs["loss"]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from readonly_ohem.distributed import GradReducer
        from readonly_ohem.caffe.solver import Solver

        net = LinearNet()
        sp = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
        solver = Solver(sp, net, reducer=GradReducer(), seed_offset=rank)
        for it in range(ITERS):
            solver.step(lambda p: _data(rank, it, p))
        torch.save({"w": net.w.detach(), "b": net.b.detach(), "frozen": net.frozen.detach()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class AveragedNet(LinearNet):
    """Both replicas' data in one process: the mean loss has the averaged gradient."""

    def forward(self, feeds):
        return {"loss": sum(LinearNet.forward(self, f)["loss"] for f in feeds) / len(feeds)}


def _reference():
    from readonly_ohem.caffe.solver import Solver

    net = AveragedNet()
    solver = Solver(text_format.Parse(SOLVER, caffe_pb2.SolverParameter()), net)
    for it in range(ITERS):
        solver.step(lambda p: [_data(r, it, p) for r in range(2)])
    return net


def test_two_gloo_processes_stay_identical_and_average_gradients(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert r0["frozen"].item() == 2.0
    ref = _reference()
    np.testing.assert_allclose(r0["w"].numpy(), ref.w.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r0["b"].numpy(), ref.b.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(r0["w"], LinearNet().w.detach())


# -- the real engine: a tiny net of Input layers with dropout -----------------------------------
NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "labels" type: "Input" top: "labels" input_param { shape { dim: 4 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc1" top: "cls_score"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels" top: "loss" }
"""


SOLVER_FILE = """train_net: "tiny.prototxt"
base_lr: 0.1
lr_policy: "step"
gamma: 0.5
stepsize: 2
momentum: 0.9
weight_decay: 0.01
iter_size: 2
display: 0
snapshot_prefix: "tiny"
"""


def _net_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import io

        from readonly_ohem.config import default_config
        from readonly_ohem.distributed import DistContext
        from readonly_ohem.train import build_trainer

        def feed(it, p):  # each replica its own data
            g = torch.Generator().manual_seed(1000 * rank + 10 * it + p)
            return {"data": torch.randn(4, 6, generator=g),
                    "labels": torch.randint(0, 3, (4,), generator=g).float()}

        cfg = default_config()
        cfg.TRAIN.SNAPSHOT_ITERS = 2
        torch.manual_seed(100 + rank)  # different dropout per replica
        ctx = DistContext(rank=rank, world_size=world)
        trainer = build_trainer(Path(out_dir) / "solver.prototxt", cfg, output=Path(out_dir) / "out",
                                ctx=ctx, feed_fn=feed, stream=io.StringIO())
        trainer.train(ITERS)
        torch.save({q.key: q.tensor.detach() for q in trainer.net.learnable_params()},
                   Path(out_dir) / f"net{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_a_real_net_identically(tmp_path):
    (tmp_path / "tiny.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER_FILE)
    mp.spawn(_net_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"net{r}.pt") for r in range(2))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # one state file per snapshot, holding each replica's RNG and data cursor
    state = read_state(tmp_path / "out" / f"tiny_iter_{ITERS}.state.safetensors")
    assert len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    for k, v in state["weights"].items():
        assert torch.equal(v, r0[k]), k
