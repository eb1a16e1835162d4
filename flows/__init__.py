import lifelong  # noqa: F401  (sets Prefect/MLflow environment before they are imported)
