"""Multi-task balancers: loss weightings, gradient aggregators, and their combinations.

``make("amtl", tasks=[...], focusing=2.0)`` builds a method by name; ``registry()`` lists every name
with its hyperparameter specs. See :mod:`amtl.balancers.base` for the contract. In a training loop of
your own: ``backward(method, losses, shared=..., heads=...)`` then ``optimizer.step()`` (see
``examples/own_loop.py``).
"""
from amtl.balancers.base import Aggregator, HParam, HParamError, StepInputs, Weighting, gramian_of
from amtl.balancers.method import (CONTEXT_KEYS, SOURCES, Method, StepReport, backward, component, context_keys,
                                   hparam_specs, make, names, register_aggregator, register_alias, register_weighting,
                                   registry)
from amtl.balancers import aggregators, weightings  # noqa: E402,F401  (registers every method)

__all__ = ["Aggregator", "CONTEXT_KEYS", "HParam", "HParamError", "Method", "SOURCES", "StepInputs", "StepReport",
           "Weighting", "backward", "component", "context_keys", "gramian_of", "hparam_specs", "make", "names",
           "register_aggregator", "register_alias", "register_weighting", "registry"]
