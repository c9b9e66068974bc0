"""Batch jobs on Ray: a large input split over worker processes, results back in the input's order.

Ray is an optional extra (`pip install 'leanformer[ray]'`); nothing here imports it at module level.
Each worker is a Ray actor that builds its state once (`setup(*setup_args)`: typically loading the
model) and then applies `work(state, item)` to the items it is handed. ray.util.ActorPool hands the
next item to whichever worker is free (a slow worker gets fewer items) and yields results in the
order of the items, so the caller sees exactly what one process applying `work` in a loop would.

What the caller must guarantee for results identical to one process: `work` on an item computes the
same arithmetic wherever it runs (e.g. the same batches, not re-batched per worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from leanformer.errors import LeanformerError

INSTALL = "pip install 'leanformer[ray]'"


def require_ray(what: str = "--ray"):
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LeanformerError(f"{what} needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(what: str = "--ray", num_cpus: int | None = None):
    """Join the running Ray cluster (ray.init's own rules: RAY_ADDRESS, else a new local one); → ray.

    A cluster already joined in this process (a test's, a notebook's) is reused as it is.
    """
    ray = require_ray(what)
    if not ray.is_initialized():
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        except Exception as e:  # e.g. "The current node timed out during startup" on an overloaded host
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LeanformerError(f"{what}: Ray could not start or join a cluster: {why}") from None
    return ray


def cluster_cpus(ray) -> int:
    """Whole CPUs the cluster offers (the default number of workers: one per CPU)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class _Worker:
    """One Ray actor: state built once, then `work(state, item)` per call, on `threads` torch threads."""

    def __init__(self, setup: Callable, setup_args: tuple, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor, no more
        self.state = setup(*setup_args)

    def run(self, work: Callable, item: Any) -> Any:
        return work(self.state, item)


def _unwrap(e: Exception) -> LeanformerError:
    """A worker's LeanformerError comes back wrapped in a RayTaskError: give the caller its one line;
    any other Ray failure (a worker killed for memory, a lost node) becomes one line too."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, LeanformerError):
        return LeanformerError(str(cause))
    why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return LeanformerError(f"a Ray worker failed: {why}")


def ordered_map(
    setup: Callable,
    setup_args: tuple,
    work: Callable[[Any, Any], Any],
    items: Sequence[Any],
    workers: int | None = None,
    desc: str = "ray",
) -> list[Any]:
    """[work(state, item) for item in items], the items spread over `workers` Ray actors (default:
    one per cluster CPU, never more than there are items), each with its own `state = setup(*args)`.

    `setup` and `work` must be importable module-level functions (Ray sends them by reference).
    """
    from tqdm import tqdm

    ray = connect()
    if workers is not None and workers < 1:
        raise LeanformerError(f"workers must be at least 1, got {workers}")
    if not items:
        return []
    n = min(workers or cluster_cpus(ray), len(items))
    cpus = max(1, cluster_cpus(ray) // n)
    actor = ray.remote(num_cpus=cpus)(_Worker)
    actors = [actor.remote(setup, setup_args, cpus) for _ in range(n)]
    pool = ray.util.ActorPool(actors)
    results: Iterator = pool.map(lambda a, item: a.run.remote(work, item), list(items))
    try:
        return list(tqdm(results, total=len(items), desc=f"{desc} ({n} Ray workers)", unit="item"))
    except ray.exceptions.RayError as e:
        raise _unwrap(e) from None
    finally:
        for a in actors:  # their models' memory is freed now, not when the driver exits
            ray.kill(a)
