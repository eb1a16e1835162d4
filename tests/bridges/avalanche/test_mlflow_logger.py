"""Avalanche's evaluation logging into MLflow through the pipeline's batched logger."""

import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from lifelong import tracking
from lifelong.bridges.avalanche.mlflow_logger import AvalancheMLflowLogger
from lifelong.config import StreamConfig
from lifelong.tasks.streams import build_stream


def test_mlflow_logger_in_plain_avalanche_code(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = tracking.client_for(uri)
    run = client.create_run(tracking.experiment_id(client, "plain"))
    stream = build_stream(StreamConfig(n_experiences=2), 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True), loss_metrics(epoch=True),
        loggers=[AvalancheMLflowLogger(tracking.MLflowLogger(run.info.run_id, tracking_uri=uri))],
    )
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=64, train_epochs=2, evaluator=evaluator)
    for exp in stream.train_stream:
        strategy.train(exp)
    strategy.eval(stream.test_stream)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert any(k.startswith("Top1_Acc_Epoch") for k in metrics)
    assert any(k.startswith("Top1_Acc_Exp") for k in metrics)
    epoch_acc = [k for k in metrics if k.startswith("Top1_Acc_Epoch")][0]
    assert len(client.get_metric_history(run.info.run_id, epoch_acc)) == 4  # 2 experiences × 2 epochs
