"""Serving: accuracy-gated optimization, serving bundles, the Ray Serve app and batch prediction.

>>> from lepton_ray.serve import optimize, deploy, predict  # doctest: +SKIP
>>> optimize("runs/digits/checkpoints/step_00000660", "data/digits/eval.parquet", "bundles/digits")  # doctest: +SKIP
>>> url = deploy("bundles/digits")  # doctest: +SKIP
"""

from lepton_ray.serve.bundle import Bundle, BundleError, load_bundle, load_checkpoint, write_bundle
from lepton_ray.serve.optimize import optimize
from lepton_ray.serve.predictor import Predictor

__all__ = ["Bundle", "BundleError", "Predictor", "deploy", "load_bundle", "load_checkpoint", "optimize", "predict",
           "write_bundle"]


def deploy(*args, **kwargs):  # imported lazily: Ray Serve is heavy to import
    """See :func:`lepton_ray.serve.app.deploy`."""
    from lepton_ray.serve.app import deploy as _deploy

    return _deploy(*args, **kwargs)


def predict(*args, **kwargs):
    """See :func:`lepton_ray.serve.batch_predict.predict`."""
    from lepton_ray.serve.batch_predict import predict as _predict

    return _predict(*args, **kwargs)
