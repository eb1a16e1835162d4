"""What a registered version records about where it came from (lifelong/registry.py lineage tags):
the experiences it has learned, the final row of its accuracy matrix, and its data's hashes."""

from __future__ import annotations

import numpy as np

from lifelong.config import Config
from lifelong.tasks.streams import Stream, data_fingerprint


def lineage_of(cfg: Config, stream: Stream, matrix: np.ndarray, parent: str | None = None) -> dict:
    """The lineage tags of a run that learned ``stream``'s experiences and ended with ``matrix``;
    ``parent``: the version it continued from (None: it started from scratch)."""
    return {"parent": parent,
            "experiences": [f.name for f in stream.files] if stream.files is not None
            else [f"exp{i}" for i in range(stream.n_experiences)],
            "final_row": [round(float(x), 6) for x in np.asarray(matrix, dtype=float)[-1]],
            "data": data_fingerprint(stream, cfg.stream.path if cfg.stream.name == "npz" else None)}
