"""In-run checkpoints on Orbax: asynchronous saves, a keep policy, and restore onto any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut short
by a crash is never listed by `latest_step()` and never read back.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lmadapt.config import CheckpointConfig


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored into this run; the message says which and why."""


class Checkpointer:
    """Train-state checkpoints of one run (`<run.dir>/checkpoints/<step>/`)."""

    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,  # half-written saves from a crash are removed on start
        )
        # Handlers are named up front so a fresh process can read metadata before its first save.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` (asynchronously if configured); `meta` is small JSON (config, data position)."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs).

        The target mesh may differ from the one that saved; a structure, shape or dtype mismatch raises
        CheckpointError instead of restoring part of the tree.
        """
        self._check_matches(step, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def _check_matches(self, step: int, abstract_state: Any) -> None:
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no readable 'state' item")
        check_tree_matches(saved, abstract_state, f"checkpoint {self.directory / str(step)}", CheckpointError)

    def wait(self) -> None:
        """Block until in-flight asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_tree_matches(saved: Any, target: Any, where: str, error: type[Exception]) -> None:
    """Raise `error` naming `where` and the first difference unless `saved` (Orbax metadata or arrays)
    has exactly `target`'s paths, shapes and dtypes: a restore is whole or not at all."""
    saved_flat, want_flat = dict(_flatten(saved)), dict(_flatten(target))
    missing = sorted(set(want_flat) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(want_flat))
    if missing or extra:
        raise error(f"{where}: tree does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, want in want_flat.items():
        got = saved_flat[path]
        if tuple(got.shape) != tuple(want.shape) or jax.numpy.dtype(got.dtype) != jax.numpy.dtype(want.dtype):
            raise error(f"{where}: {path} is {jax.numpy.dtype(got.dtype)}{list(got.shape)} in the checkpoint but "
                        f"the model expects {jax.numpy.dtype(want.dtype)}{list(want.shape)}")


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return [(_path_str(path), leaf) for path, leaf in leaves[0]]


def _path_str(path) -> str:
    # Orbax stores dataclass fields as dict keys: compare by name, whatever the key kind.
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
