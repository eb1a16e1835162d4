"""Keep learning when new data lands: a registered version of a lineage continues on the files of a
folder stream it has not learned, from its weights *and* its continual state, and the next version
of the lineage records it as its parent.

What a version keeps for this (``continual_state.pt``, an artifact of its run, written only for
folder streams): the learner's state as a run checkpoint holds it (``bridges/avalanche/checkpoint.py``:
model, optimizer, clock, regulariser anchors and importances, replay memory, plugin state such as
OVOR's prompts), the rows of its accuracy matrix, the names of the files it learned, and the shape
of its inputs and outputs.

Everything a continuation needs is checked by :func:`plan` before any MLflow run is opened: the
version and its state exist, its strategy and model are the config's, the files it learned are still
in the folder unchanged and first in order, new files fit its inputs and outputs. Nothing new to
learn is :class:`NothingNew` — not an error for a schedule that checks for data (``lifelong run``
says so and exits 0).

Drift on arrival: the new experiences' training inputs against the learned ones', on the version's
own features (its penultimate layer), one two-sample Kolmogorov–Smirnov test per feature
(``scipy.stats.ks_2samp``) with a Bonferroni correction over the features — the test alibi-detect's
``KSDrift`` makes, from SciPy directly. Its p-value is a metric of the run and of the version, so a
gate can hold a drifted arrival back for a person to look at (``drift_p_value >= 0.01``).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lifelong import registry
from lifelong.bridges.avalanche.checkpoint import NotCheckpointable, learner_state
from lifelong.config import Config, strategy_label
from lifelong.tasks.streams import Stream

STATE_ARTIFACT = "continual_state.pt"
STATE_VERSION = 1
#: Training inputs per side of the drift test (the learned experiences' share, the new ones').
DRIFT_SAMPLES = 500


class ContinuationError(ValueError):
    """A continuation that cannot start; the message names the version, the file or the key."""


class NothingNew(ContinuationError):
    """The folder holds no experience the version has not learned: nothing to do."""


@dataclass
class Continuation:
    name: str  # the registered model (the lineage)
    version: str  # the version continued from: the new version's parent
    learned: list[str]  # the files it learned, in order
    state: dict  # its learner state, as saved

    @property
    def n_learned(self) -> int:
        return len(self.learned)

    def learner_state(self, n_experiences: int) -> dict:
        """The saved state as :meth:`Learner.restore` takes it: its matrix rows widened to the grown
        stream (NaN where an experience had not arrived yet), the next experience the first new one."""
        rows = [list(r) + [float("nan")] * (n_experiences - len(r)) for r in self.state["rows"]]
        return {**self.state["learner"], "rows": rows, "trace": [], "next_experience": self.n_learned}


def lineage_name(cfg: Config, stream_name: str) -> str:
    return registry.model_name("continual", cfg.tracking.model_name, stream_name, strategy_label(cfg.strategies[0]))


def save_state(learner, client) -> None:
    """Keep what a continuation needs on the run (folder streams only; see the module docstring)."""
    stream = learner.stream
    if stream.files is None:
        return
    try:
        state = learner_state(learner.strategy)
    except NotCheckpointable:
        return  # said when the learner was built; a continuation of it is refused with the reason
    payload = {"version": STATE_VERSION, "learner": state, "rows": [list(r) for r in learner.rows],
               "experiences": [f.name for f in stream.files], "label": learner.label,
               "input_shape": list(stream.input_shape), "n_classes": stream.n_classes}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / STATE_ARTIFACT
        torch.save(payload, path)
        client.log_artifact(learner.run_id, str(path))


def plan(cfg: Config, uri: str, stream: Stream) -> Continuation:
    """Check everything a continuation of ``cfg.tracking.continue_from`` needs; raise before any work."""
    ref = cfg.tracking.continue_from
    name = lineage_name(cfg, stream.name)
    where = f"{name}/{ref}" if ref.isdigit() else f"{name}@{ref}"
    try:
        v = registry.show(uri, where)
    except registry.RegistryLookupError as exc:
        if "no registered model" in str(exc):
            hint = "start the lineage with a run without continue_from"
        elif "has no alias" in str(exc):
            hint = ("a version takes an alias through tracking.gates (or promote_if), or by hand: `lifelong "
                    "registry promote NAME VERSION`; or continue from a version number")
        else:
            hint = "give an alias or a version number the lineage has"
        raise ContinuationError(f"tracking.continue_from: {exc}; {hint}") from None
    what = f"continuing {name} v{v.version}"
    label = strategy_label(cfg.strategies[0])
    if v.tags.get("strategy") != label:
        raise ContinuationError(f"{what}: it was trained with strategy {v.tags.get('strategy')!r}, the config "
                                f"has {label!r}")
    _check_same(what, v.config, cfg)
    # The files it learned, from its lineage tag: an idle check (a schedule's, every few minutes) ends
    # here without downloading the continual state, which holds the model and the replay memory.
    recorded = _files(v)
    learned = [e.get("file") for e in recorded]
    names = [f.name for f in stream.files]
    if names[:len(learned)] != learned:
        raise ContinuationError(f"{what}: it learned {learned}, but the folder's first files are "
                                f"{names[:len(learned)]}; new experiences must sort after the learned ones")
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in stream.files]
    for i, e in enumerate(recorded):
        if e.get("sha256") and digests[i] != e["sha256"]:
            raise ContinuationError(f"{what}: {names[i]} changed since it was learned (sha256 differs); "
                                    "a learned experience is never rewritten: add new data as a new file")
    if len(names) == len(learned):
        raise NothingNew(f"nothing new to learn: {stream.files[0].parent} holds the {len(names)} experience(s) "
                         f"{name} v{v.version} has learned")
    tried = _tried(uri, name, v.version, names, digests)
    if tried is not None:  # a schedule would otherwise register a refused version at every check
        raise NothingNew(f"nothing new to learn: v{tried.version} already continued v{v.version} on these files "
                         f"({tried.promotion or 'no gates decided'}); add new data, replace the new file, or "
                         f"promote v{tried.version} by hand (`lifelong registry promote {name} {tried.version}`)")
    state = _download_state(what, v, uri)
    if list(state["experiences"]) != learned:
        raise ContinuationError(f"{what}: its {STATE_ARTIFACT} learned {state['experiences']}, its lineage tag "
                                f"says {learned}; the version's records disagree")
    if tuple(state["input_shape"]) != tuple(stream.input_shape):
        raise ContinuationError(f"{what}: its inputs have shape {tuple(state['input_shape'])}, the folder's "
                                f"files {tuple(stream.input_shape)}")
    if state["n_classes"] != stream.n_classes:
        raise ContinuationError(f"{what}: its model has {state['n_classes']} outputs (classes 0.."
                                f"{state['n_classes'] - 1}), the folder's files have {stream.n_classes} classes; "
                                "fix the new file's labels, or start a new lineage with stream.n_classes set to "
                                "leave room for new classes")
    return Continuation(name, v.version, learned, state)


def _files(v) -> list[dict]:
    """A version's learned files as its lineage tag records them (file, sha256, tensor hashes)."""
    return (registry.lineage_fields(v)["data"] or {}).get("experiences", [])


def _tried(uri: str, name: str, parent: str, names: list[str], digests: list[str]):
    """A child of ``parent`` that already learned exactly these files (names and contents), if any."""
    for other in registry.lineage(uri, name):
        files = _files(other)
        if (registry.lineage_fields(other)["parent"] == parent and [e.get("file") for e in files] == names
                and [e.get("sha256") for e in files] == digests):
            return other
    return None


def _check_same(what: str, saved: dict[str, str], cfg: Config) -> None:
    """The model and strategy settings must be the version's: the state fits no other learner."""
    mine = {k: str(v) for k, v in cfg.flat().items() if k.startswith("model.")}
    mine.update({f"strategy.{k}": str(v) for k, v in cfg.strategies[0].model_dump(mode="json").items()})
    for k, v in sorted(mine.items()):
        theirs = saved.get(k)
        if theirs is not None and theirs != v:
            raise ContinuationError(f"{what}: {k} is {theirs} there and {v} in the config; a continuation "
                                    "keeps the lineage's model and strategy")


def _download_state(what: str, v, uri: str) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    if not v.run_id:
        raise ContinuationError(f"{what}: the version has no run to read its continual state from")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path=STATE_ARTIFACT,
                                                       dst_path=tmp, tracking_uri=uri)
        except (MlflowException, OSError):  # the artifact is not there
            raise ContinuationError(f"{what}: its run {v.run_id} kept no {STATE_ARTIFACT} (only runs of a "
                                    "folder stream keep it, and only strategies whose state checkpoints do)") from None
        state = torch.load(path, weights_only=False)
    if state.get("version") != STATE_VERSION:
        raise ContinuationError(f"{what}: its {STATE_ARTIFACT} is format {state.get('version')}, this "
                                f"Lifelong reads format {STATE_VERSION}")
    return state


# --------------------------------------------------------------------------- drift on arrival


def _share(stream: Stream, experiences: range, n: int) -> torch.Tensor:
    """Up to ``n`` training inputs spread evenly over ``experiences`` (the first of each, deterministic)."""
    per = max(1, n // len(experiences))
    return torch.cat([stream.train_tensors(i)[0][:per] for i in experiences])


@torch.no_grad()
def drift(model: torch.nn.Module, stream: Stream, n_learned: int, device: str = "cpu") -> dict[str, float]:
    """The new experiences' inputs against the learned ones', on ``model``'s features (see the module
    docstring): ``p_value`` (Bonferroni-corrected), ``statistic`` (the largest KS distance) and
    ``features_drifted`` (the share of features whose own test rejects at 0.05 after correction)."""
    was = model.training
    model.eval()
    try:
        old = model.features(_share(stream, range(n_learned), DRIFT_SAMPLES).to(device)).flatten(1).cpu()
        new = model.features(_share(stream, range(n_learned, stream.n_experiences), DRIFT_SAMPLES)
                             .to(device)).flatten(1).cpu()
    finally:
        model.train(was)
    return drift_test(old.numpy(), new.numpy())


def drift_test(old: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Per-feature two-sample KS tests, Bonferroni over the features (constant features skipped)."""
    from scipy.stats import ks_2samp

    varying = (old.std(0) > 0) | (new.std(0) > 0)
    d = int(varying.sum())
    if d == 0:
        return {"p_value": 1.0, "statistic": 0.0, "features_drifted": 0.0}
    res = ks_2samp(old[:, varying], new[:, varying], axis=0)
    p = np.minimum(1.0, np.asarray(res.pvalue) * d)
    return {"p_value": float(p.min()), "statistic": float(np.max(res.statistic)),
            "features_drifted": float((p < 0.05).mean())}
