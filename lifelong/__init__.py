"""Lifelong: continual and federated learning pipelines.

Importing the package prepares the process environment (Prefect's home and
analytics, the default MLflow store) before Prefect or MLflow are imported.
"""

from lifelong.env import configure_environment

configure_environment()

__version__ = "0.1.0"
