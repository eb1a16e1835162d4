"""Lifelong: continual and federated learning pipelines.

Importing the package prepares the process environment (Prefect's home and
analytics, the default MLflow store) before Prefect or MLflow are imported, and keeps qpsolvers'
JAX backends from loading with Avalanche (``lifelong.env.hide_jax_qp_backends``).

One namespace, two layouts. Installed, ``lifelong.flows`` is the folder ``lifelong/flows/``. In
the source tree (a checkout, a Flower app folder a SuperNode unpacked, a Docker image's working
directory) ``flows/`` sits *beside* ``lifelong/``; whenever this package is imported from such a
tree — it comes first on ``sys.path`` there — its subpackages are found beside it, so one tree's
code is never mixed with another installed copy's.
"""

from pathlib import Path as _Path

from lifelong.env import configure_environment, hide_jax_qp_backends

_HERE = _Path(__file__).resolve().parent
if not (_HERE / "flows").is_dir() and (_HERE.parent / "flows" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821  (the package's own search path)

configure_environment()
hide_jax_qp_backends()  # before anything imports Avalanche

__version__ = "0.1.0"
