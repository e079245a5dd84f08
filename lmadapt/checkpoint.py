"""In-run checkpoints on Orbax: asynchronous saves, a keep policy, and restore onto any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut short
by a crash is never listed by `latest_step()` and never read back. Each checkpoint is committed with a
content manifest (`<step>/MANIFEST.json`, see manifest.py), which `verify` checks before a resume, so a
checkpoint damaged later (truncated copy, flipped bits, a file dropped in) is never restored.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lmadapt.config import CheckpointConfig
from lmadapt.files import manifest

# Orbax rewrites these at commit, after the manifest is written; everything else in a step is covered.
ORBAX_COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored into this run; the message says which and why."""


class Checkpointer:
    """Train-state checkpoints of one run (`<run.dir>/checkpoints/<step>/`)."""

    def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
        """`read_only`: for inspecting a run that may be live (nothing is created, cleaned or saved)."""
        self.directory = epath.Path(directory)
        self._async = cfg.async_save
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else cfg.keep,  # (Orbax warns about these when read-only)
            save_interval_steps=0 if read_only else 1,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # half-written saves from a crash are removed on start
            # Runs in Orbax's background thread once a save is committed (on every process).
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_committed) if cfg.async_save
            else None,
        )
        # Handlers are named up front so a fresh process can read metadata before its first save.
        if not read_only and jax.process_index() == 0 and self.directory.is_dir():
            # Saves cut short by a crash; Orbax's own cleanup does not catch every kind.
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        for attempt in range(5):
            try:
                self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
                break
            except FileNotFoundError:
                # A reader beside a live run: the run deleted an old checkpoint (checkpoint.keep) between
                # Orbax listing the steps and reading their times (seen in the fault suite). List again.
                if not read_only or attempt == 4:
                    raise
                time.sleep(0.2)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` (asynchronously if configured); `meta` is small JSON (config, data position)."""
        if step in self._manager.all_steps():
            return False
        try:
            # An asynchronous save that failed in the background (disk full, ...) raises here, at the next one.
            started = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                      meta=ocp.args.JsonSave(meta)), force=force)
            if not self._async and jax.process_index() == 0:  # the callback belongs to asynchronous saves
                manifest.write(str(self.directory / str(step)), ORBAX_COMMIT_FILES)
        except Exception as e:
            raise self._failure(e) from None
        return started

    def _failure(self, error: Exception) -> CheckpointError:
        """The error for a save that failed: what went wrong and which checkpoint is still complete. The
        partial write is removed so that a full disk gets its space back."""
        self._failed = True
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        self._manager.reload()
        steps = list(self._manager.all_steps())
        last = f"the last complete checkpoint is {self.directory / str(max(steps))}" if steps else \
            "no checkpoint of this run is complete"
        text = str(error).strip()
        cause = "no space left on device" if "No space left" in text or "os_error_code='28'" in text else \
            f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
        return CheckpointError(f"saving a checkpoint in {self.directory} failed ({cause}); {last}")

    def _seal_committed(self) -> None:
        """Write the manifest of the save that is finishing (process 0; all processes' files are in place).

        Orbax calls this after the items are finalised and before it renames the temporary directory
        into place, so the manifest is part of what is committed. Only the finishing save has a
        temporary directory at that point (earlier ones are committed, crashed ones were cleaned up)."""
        if jax.process_index() == 0:
            for path in self.directory.glob("*.orbax-checkpoint-tmp*"):
                if path.is_dir() and not manifest.has_manifest(str(path)):
                    manifest.write(str(path), ORBAX_COMMIT_FILES)

    def verify(self, step: int) -> list[str]:
        """Problems with checkpoint `step` (empty if intact): see `manifest.check`. A checkpoint committed
        but never sealed (the process died between the two) is reported as unverifiable, not damaged."""
        return manifest.check(str(self.directory / str(step)), ORBAX_COMMIT_FILES)

    def newest_intact(self, below: int | None = None) -> int | None:
        """The newest checkpoint (below step `below`) whose manifest checks out, or None."""
        for step in sorted(self.all_steps(), reverse=True):
            if (below is None or step < below) and not self.verify(step):
                return step
        return None

    def read_meta(self, step: int) -> dict[str, Any]:
        """The small JSON saved beside checkpoint `step` (its config, ...), without restoring the state."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # an unreadable item is reported from deep inside Orbax, as any exception type
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has unreadable metadata "
                                  f"({type(e).__name__}: {first})") from None
        return meta if isinstance(meta, dict) else {}

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs).

        The target mesh may differ from the one that saved; a structure, shape or dtype mismatch raises
        CheckpointError instead of restoring part of the tree.
        """
        self._check_matches(step, abstract_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # damage is reported from deep inside TensorStore, as any exception type
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: "
                                  f"{first})") from None
        return restored["state"], restored["meta"]

    def _check_matches(self, step: int, abstract_state: Any) -> None:
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception as e:  # unreadable metadata: same as a damaged checkpoint
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has unreadable metadata "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        if saved is None:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no readable 'state' item")
        check_tree_matches(saved, abstract_state, f"checkpoint {self.directory / str(step)}", CheckpointError)

    def wait(self) -> None:
        """Block until in-flight asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for in-flight saves; raise CheckpointError if one failed (once: not again after a save did)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if not self._failed:
                raise self._failure(e) from None
        finally:
            with contextlib.suppress(Exception):  # closing after a failed save may fail the same way
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
