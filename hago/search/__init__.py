"""The search engine: the fastest strategy that meets an accuracy target, measured on the target.

Modules, one job each: ``space`` (knobs from the spec), ``target`` (the
accuracy target and metric), ``log`` (append-only JSONL, resumable),
``costmodel`` (xgboost on measured candidates), ``sizes`` (weight bytes of a
point predicted from per-layer realized counts, for a size budget), ``algorithms`` (greedy HAGO,
latency-aware, cost-model-guided evolution), ``engine`` (evaluates candidates
and keeps the front), ``pareto`` (front, table and plot). Latency on the
device comes through a :class:`hago.measure.Measurer` (a child process with
a time-out, or RPC).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """``hago.search`` is both this package and the public function: calling it runs :func:`hago.search.run.search`.

    The function cannot simply be an attribute of ``hago`` named ``search``:
    importing any ``hago.search.*`` module sets that attribute to this package
    (the import system binds every submodule on its parent), so the package
    itself must be callable. It imports nothing until called.
    """

    def __call__(self, model, device, calib, eval_data, **options):
        from .run import search

        return search(model, device, calib, eval_data, **options)


sys.modules[__name__].__class__ = _CallablePackage
