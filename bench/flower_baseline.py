"""Flower's own ``run_simulation`` on the federated benchmark's workload: the baseline our Ray
backend is held to (issue: "the Ray backend's cost at most Flower's own run_simulation on the
same config").

What a user writing a plain Flower app for this workload would run: Flower's ``FedAvg``
(Message API, flwr 1.42), one ``strategy.start`` of one round per experience, the global model
evaluated on every experience after every round (``evaluate_fn``), and a ClientApp that trains
the same model (the same architecture and initial weights, as TorchScript so that the Ray actors
import no project code), on the same client shares, with the same optimizer, batch size and
epochs, in plain PyTorch — no Avalanche, MLflow, Prefect, checkpoints or client state. Ray is
started as our backend starts it (``ray_init_args``), with the same CPUs per client. The shares,
model and test data are written to a folder first (not timed); ``BENCH_FLOWER_DATA`` tells the
actors where.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import torch

DATA_ENV = "BENCH_FLOWER_DATA"
#: "1": each client process also imports Avalanche's training package (once, at its first
#: message), as a Lifelong client must: the baseline with the learning library's start-up cost.
AVALANCHE_ENV = "BENCH_FLOWER_IMPORT_AVALANCHE"


def prepare(cfg, folder: Path) -> None:
    """Each client's share of each experience, the test split and the initial model, in ``folder``."""
    from lifelong.flows.federated import initial_weights
    from lifelong.tasks.models import build_model
    from lifelong.tasks.partition import client_indices
    from lifelong.tasks.streams import build_stream

    stream = build_stream(cfg.stream, cfg.seed)
    shares = {}
    for e in range(stream.n_experiences):
        x, y, _ = stream.train_tensors(e)
        for pid, idx in enumerate(client_indices(cfg, stream, e)):
            shares[(e, pid)] = (x[idx].clone(), y[idx].clone())
    test = [tuple(t.clone() for t in stream.test_tensors(e)[:2]) for e in range(stream.n_experiences)]
    model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False,
                        input_stats=stream.input_stats)
    model.load_state_dict(initial_weights(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"shares": shares, "test": test, "n_experiences": stream.n_experiences,
                "epochs": cfg.training.epochs, "batch_size": cfg.training.batch_size,
                "optimizer": (cfg.training.optimizer, cfg.training.lr, cfg.training.momentum, cfg.training.weight_decay),
                "seed": cfg.seed}, folder / "data.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript: deprecated, still the way to ship a module without its code
        torch.jit.save(torch.jit.script(model), folder / "model.pt")


def _load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.load(folder / "data.pt", weights_only=False), torch.jit.load(folder / "model.pt")


def local_sgd(model, x, y, opt, epochs: int, batch_size: int, generator: torch.Generator) -> None:
    """Plain mini-batch SGD on one client's share (the bare loop's too, ``bench/federated.py``)."""
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for b in range(math.ceil(len(x) / batch_size)):
            sel = perm[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            opt.step()


def _optimizer(params, name: str, lr: float, momentum: float, weight_decay: float):
    """The training config's optimizer (as ``make_optimizer`` builds it)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if os.environ.get(AVALANCHE_ENV) == "1":
            import avalanche.training  # noqa: F401  (a no-op after the process's first message)
        data, model = _load(Path(os.environ[DATA_ENV]))
        pid, e = int(context.node_config["partition-id"]), int(msg.content["config"]["experience"])
        x, y = data["shares"][(e, pid)]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        opt = _optimizer(model.parameters(), *data["optimizer"])
        local_sgd(model, x, y, opt, data["epochs"], data["batch_size"],
                  torch.Generator().manual_seed(data["seed"] * 1000 + pid))
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=msg)

    return app


def run(cfg, folder: Path, import_avalanche: bool = False) -> dict:
    """Seconds of Flower's ``run_simulation`` over the whole workload (Ray's start included, as
    our Ray figure includes it), and the final global model's mean accuracy (a sanity check).
    ``import_avalanche``: the clients' processes also import Avalanche (``AVALANCHE_ENV``)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from lifelong.clients.launch import quiet_flower, ray_init_args

    data, model = _load(folder)
    n = cfg.federated.clients
    out: dict[str, float] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        @torch.no_grad()
        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            accs = [float((model(x).argmax(1) == y).float().mean()) for x, y in data["test"]]
            return MetricRecord({"acc": sum(accs) / len(accs)})

        arrays = ArrayRecord(model.state_dict())
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n)
        for e in range(data["n_experiences"]):
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.federated.rounds,
                                    train_config=ConfigRecord({"experience": e}), evaluate_fn=evaluate)
            arrays = result.arrays
        out["final_acc"] = float(evaluate(0, arrays)["acc"])

    quiet_flower()
    os.environ[DATA_ENV] = str(folder.resolve())  # Ray's workers inherit this process's environment
    os.environ[AVALANCHE_ENV] = "1" if import_avalanche else "0"
    repo = str(Path(__file__).resolve().parents[1])  # and find this module (the ClientApp's code) there
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    backend = {"client_resources": {"num_cpus": cfg.federated.ray_cpus_per_client, "num_gpus": 0.0},
               "init_args": ray_init_args(None)}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server, client_app=client_app(), num_supernodes=n, backend_config=backend)
    out["seconds"] = time.perf_counter() - t
    if "final_acc" not in out:
        raise RuntimeError("Flower's simulation ended without a result; see its log above")
    return out
