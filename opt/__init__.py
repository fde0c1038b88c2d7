"""OPT platform: data preparation, FSDP training on Ray, evaluation, gated registration and access.

Heavy libraries (ray, mlflow, prefect, boto3, transformers) are imported inside the functions that
need them, so `import opt` stays fast.
"""

__version__ = "0.1.0"
