"""measure: latency of a build on its device, behind one :class:`Measurer` protocol.

One module per way of running a build:

* :mod:`~hago.measure.base`: :class:`Measurement` (errors are data, not
  exceptions), the :class:`Measurer` protocol, the time-out check;
* :mod:`~hago.measure.local`: this machine: :func:`measure_local` in this
  process (``hago compile``), :class:`LocalMeasurer` in a time-out child
  (the search), and the thread pool sized to the spec's cores
  (:func:`device_threads`, :func:`pool_threads`);
* :mod:`~hago.measure.worker`: that child (``python -m hago.measure.worker``);
* :mod:`~hago.measure.rpc`: a board or GPU host through TVM's RPC tracker
  (:func:`check_tracker` up front, :func:`measure_rpc`, :func:`run_rpc`,
  :class:`RPCMeasurer`);
* :mod:`~hago.measure.qemu`: aarch64 builds under ``qemu-aarch64``, for
  correctness only (qemu timings say nothing about a board).

Nothing here imports TVM at module level, so the CLI can build a measurer
before the heavy imports.
"""

from .base import InputSpec, Measurement, Measurer, check_timeout
from .local import THREADS_ENV, LocalMeasurer, device_threads, example_args, measure_local, pool_threads
from .rpc import RPCMeasurer, check_tracker, measure_rpc, parse_tracker, run_rpc, session

__all__ = [
    "InputSpec", "LocalMeasurer", "Measurement", "Measurer", "RPCMeasurer", "THREADS_ENV", "check_timeout",
    "check_tracker", "device_threads", "example_args", "measure_local", "measure_rpc", "parse_tracker",
    "pool_threads", "run_rpc", "session",
]
