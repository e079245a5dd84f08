"""Device mesh, logical-axis rules and shardings: the only place that knows mesh axis names.

The model names every parameter and activation axis logically ("embed", "heads", "batch", ...);
`mesh.rules` in the config maps those names onto the mesh axes `data`, `fsdp` and `tensor`.
One code path serves 1 CPU and a multi-host cluster: every array here is a global `jax.Array`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmadapt.config import DistributedConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


class ShardingError(ValueError):
    """The mesh or the batch does not fit the devices; the message names the config keys."""


def maybe_initialize_distributed(cfg: DistributedConfig) -> bool:
    """Call `jax.distributed.initialize` when asked to, or when the environment is a cluster job.

    `mode: on` with explicit coordinator/process settings is for hand-launched jobs; `auto` lets JAX
    detect SLURM, TPU VMs and the `JAX_COORDINATOR_ADDRESS` style variables. Returns whether it ran.
    Must run before anything touches a device.
    """
    if cfg.mode == "off" or jax.distributed.is_initialized():
        return False
    cluster_env = any(k in os.environ for k in ("SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                                                "MEGASCALE_COORDINATOR_ADDRESS"))
    explicit = cfg.coordinator_address is not None
    if cfg.mode == "auto" and not (explicit or cluster_env):
        return False
    # A single-task SLURM allocation (an interactive `srun python ...`) is not a distributed job.
    if cfg.mode == "auto" and not explicit and os.environ.get("SLURM_NTASKS", "2") == "1":
        return False
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=cfg.local_device_ids,
        initialization_timeout=cfg.initialization_timeout,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout,
        shutdown_timeout_seconds=cfg.shutdown_timeout,
    )
    return True


def resolve_mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; raise ShardingError naming the keys if they do not fit."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if n_devices % known:
            raise ShardingError(f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide the "
                                f"{n_devices} devices")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ShardingError(f"mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes.values())} ({sizes}) but there are "
                            f"{n_devices} devices; the product must equal the device count (or set one axis to -1)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices, laid out for the interconnect.

    Axis types are Auto: sharding is propagated by XLA from the parameter/batch shardings and the
    model's logical constraints (the GSPMD style MaxText uses).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_as_tuples(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Config rules ([name, axis | [axes] | None]) in the tuple form flax expects."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names.

    A dimension whose size the mapped mesh axes do not divide is replicated instead (e.g. a vocab of
    50257 over tensor=2): correct everywhere, and cheaper than padding the user's model.
    """
    spec = nn.logical_to_mesh_axes(tuple(names), rules_as_tuples(rules))
    out = []
    for dim, axes in zip(shape, spec, strict=True):
        # Size-1 mesh axes are dropped so specs read as what is really split (P(None, None) on a pure
        # data-parallel mesh), which is also what the equivalence tests assert on.
        group = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,) if axes else ()) if mesh.shape[a] > 1)
        if not group or dim % math.prod(mesh.shape[a] for a in group):
            out.append(None)
        else:
            out.append(group[0] if len(group) == 1 else group)
    return PartitionSpec(*out)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves are `nn.Partitioned` (logical names) or plain arrays.

    Plain leaves (step counters, optimizer scalars) are replicated.
    """

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of [batch, length] input arrays: batch over the mesh axes the "batch" rule names."""
    spec = nn.logical_to_mesh_axes(("batch", "activation_length"), rules_as_tuples(rules))
    return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split (data x fsdp with the default rules)."""
    axes = batch_sharding(mesh, rules).spec[0]
    group = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    return math.prod(mesh.shape[a] for a in group)


def local_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The contiguous rows of the global batch that this process's devices hold.

    Each process builds only these rows (the data order is a pure function of seed and step), so
    N processes together feed exactly the global batch one process would.
    """
    index_map = sharding.addressable_devices_indices_map((global_batch, 1))
    starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ShardingError("this process's batch shards are not contiguous; build the mesh with "
                            "lmadapt.sharding.make_mesh")
    return slice(lo, hi)


def make_global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_batch: int) -> dict:
    """Assemble process-local numpy rows into global sharded `jax.Array`s."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
            for k, v in local.items()}
