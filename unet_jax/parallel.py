"""Data parallelism with jit over a device mesh: the batch is sharded on the
`data` axis and the train state is replicated.

One code path serves one CPU, N local devices and many hosts; XLA inserts
the cross-device reductions (gradients, batch-norm statistics) itself.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None, num_processes: int,
                           process_id: int) -> None:
  """Joins a multi-process run through JAX's own runtime (no-op for one process).

  On CPU the collectives go over gloo, so several local processes on
  loopback behave like several hosts.
  """
  if num_processes <= 1:
    return
  if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices`, by default every device of every process."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def device_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's numeric arrays (strings stay behind)."""
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items() if np.asarray(value).dtype.kind in "biuf"}


def put_global_batch(images: np.ndarray, mesh: Mesh) -> tuple[jax.Array, int]:
  """Shards a batch that every process holds in full, padding it to the device count.

  Returns:
    The sharded batch and the number of real (unpadded) rows.
  """
  count = len(images)
  padded = np.concatenate([images, np.repeat(images[-1:], -count % jax.device_count(), axis=0)])
  return jax.device_put(padded, batch_sharded(mesh)), count


def to_host(tree: Any) -> Any:
  """Brings (possibly multi-host) arrays back as numpy, gathered from every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
