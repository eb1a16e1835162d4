"""An Avalanche learner's state as plain tensors, so a run can stop and resume exactly.

Avalanche's own ``save_checkpoint`` pickles the whole strategy with dill, plugins and loggers
included; ours hold an MLflow client, a Prefect-run progress bar and the stream, which do not
pickle (dill stops on a typing sentinel inside them). So the state is taken explicitly, piece
by piece: the model, the optimizer (Avalanche keeps Adam's moments across experiences), the
training clock, every regulariser's ``state_dict``, the replay memory (samples and Avalanche's
reservoir weights), the RNGs (via Avalanche's ``RNGManager``) and the state of every plugin that
says how to take it (``checkpoint_state`` / ``load_checkpoint_state``: OnePrompt's seen classes,
GCond arbitration's EMA norms, previous gradients and win history). A plugin whose state is not
captured makes :func:`check_checkpointable` refuse, rather than resume it wrongly.
"""

from __future__ import annotations

import torch
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.plugins.clock import Clock
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.templates.base_sgd import PeriodicEval

from lifelong.bridges.avalanche.plugin import RegularizerPlugin
from lifelong.tasks.streams import samples_dataset


def _stateless(plugin) -> bool:
    """A plugin with no state of its own across experiences: Avalanche's clock (its state is
    captured apart) and periodic evaluation (off: eval_every=-1), and ours that say so with
    ``checkpoint_stateless = True`` (progress, the continual evaluator whose trace is the flow's)."""
    return isinstance(plugin, (Clock, PeriodicEval)) or getattr(plugin, "checkpoint_stateless", False)


class NotCheckpointable(ValueError):
    """A learner with state this module cannot capture; the message names the plugin."""


def _stateful(strategy) -> list:
    """Plugins that checkpoint themselves, in the strategy's order."""
    return [p for p in strategy.plugins if hasattr(p, "checkpoint_state") and hasattr(p, "load_checkpoint_state")]


def check_checkpointable(strategy) -> None:
    for p in strategy.plugins:
        if isinstance(p, (RegularizerPlugin, ReplayPlugin, EvaluationPlugin)) or _stateless(p):
            continue
        if p in _stateful(strategy):
            continue
        raise NotCheckpointable(f"{type(p).__name__} keeps state that checkpoints do not capture yet; "
                                "this strategy cannot be resumed")


def buffer_state(storage: ExperienceBalancedBuffer) -> dict[str, torch.Tensor]:
    """An experience-balanced reservoir buffer, group by group, with its reservoir weights."""
    state = {}
    for g, buf in storage.buffer_groups.items():
        data = buf.buffer.eval()
        if len(data):
            x, y, t = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        else:
            x, y, t = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        # Avalanche's private reservoir weights: without them a restored group would not keep the
        # same samples when it is shrunk to make room for the next experience.
        state.update({f"{g}/x": x, f"{g}/y": y, f"{g}/t": t, f"{g}/w": buf._buffer_weights,
                      f"{g}/size": torch.tensor(buf.max_size)})
    return state


def load_buffer_state(storage: ExperienceBalancedBuffer, state: dict[str, torch.Tensor]) -> None:
    groups = sorted({int(k.split("/")[0]) for k in state})
    storage.buffer_groups = {}
    for g in groups:
        buf = ReservoirSamplingBuffer(int(state[f"{g}/size"]))
        buf.buffer = samples_dataset(state[f"{g}/x"], state[f"{g}/y"], state[f"{g}/t"])
        buf._buffer_weights = state[f"{g}/w"]
        storage.buffer_groups[g] = buf
    storage._num_exps = len(groups)


def learner_state(strategy) -> dict:
    check_checkpointable(strategy)
    state = {
        "model": {k: v.detach().cpu().clone() for k, v in strategy.model.state_dict().items()},
        "optimizer": strategy.optimizer.state_dict(),
        "clock": {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int)},
        "rng": RNGManager.__getstate__(),
        "regularizers": [p.regularizer.state_dict() for p in strategy.plugins if isinstance(p, RegularizerPlugin)],
        "plugins": [(type(p).__name__, p.checkpoint_state()) for p in _stateful(strategy)],
    }
    replay = next((p for p in strategy.plugins if isinstance(p, ReplayPlugin)), None)
    if replay is not None:
        state["replay"] = buffer_state(replay.storage_policy)
    return state


def load_learner_state(strategy, state: dict) -> None:
    check_checkpointable(strategy)
    strategy.model.load_state_dict(state["model"])
    # Avalanche maps optimizer slots to parameters by id(); a strategy that has not trained yet
    # would otherwise reset the optimizer's state on its first experience. Its first experience
    # also appends every model parameter the optimizer lacks (OnePrompt's frozen backbone) to the
    # optimizer: done here the same way, so the saved slots line up with the same parameters.
    strategy.optimized_param_id = update_optimizer(strategy.optimizer, dict(strategy.model.named_parameters()),
                                                   None, reset_state=True)
    strategy.optimizer.load_state_dict(state["optimizer"])
    for k, v in state["clock"].items():
        setattr(strategy.clock, k, v)
    regs = [p for p in strategy.plugins if isinstance(p, RegularizerPlugin)]
    for p, s in zip(regs, state["regularizers"], strict=True):
        p.regularizer.load_state_dict(s)
    replay = next((p for p in strategy.plugins if isinstance(p, ReplayPlugin)), None)
    if replay is not None:
        load_buffer_state(replay.storage_policy, state["replay"])
    plugins = _stateful(strategy)
    saved = state["plugins"]
    if [type(p).__name__ for p in plugins] != [name for name, _ in saved]:
        raise NotCheckpointable(f"the checkpoint holds the state of plugins {[n for n, _ in saved]}, "
                                f"the learner has {[type(p).__name__ for p in plugins]}")
    for p, (_, s) in zip(plugins, saved):
        p.load_checkpoint_state(s, strategy.device)
    RNGManager.__setstate__(state["rng"])
