"""Checkpoints for the trainers: orbax with two items per step, and loud failures.

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=100, keep=3)
    step = ckpt.latest_step()                            # None on a fresh run
    if step is not None:
        state, data = ckpt.restore(step, abstract_state)  # ShapeDtypeStructs with shardings
        data_iter.set_state(data["iterator"])
    ...
    if ckpt.should_save(step):
        ckpt.save(step, state, {"iterator": data_iter.get_state()})
    ckpt.close()                                          # waits for the last save

Each step directory holds `state` (a pytree of jax arrays: params, optimizer state, step,
RNG key *data* as uint32, possibly sharded; orbax's StandardSave, OCDBT) and `data` (JSON:
the grain iterator state and any metadata; JsonSave). Saves are asynchronous: `save`
returns once the arrays are copied off the device (so the next step may donate them), and
the files are written in the background; `wait()` blocks until they are on disk.

A run must never silently start over because its checkpoint is damaged. Orbax writes a
step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when done, leaving the
commit marker `commit_success.txt` inside; so a temporary directory (a save killed by
SIGKILL) is ignored, while a step directory that is not complete (no commit marker,
missing item, unreadable metadata, truncated or deleted array files, a tree that does not
match the model) raises `CheckpointError` naming the directory and the problem. The fix
is then the user's call: delete that step directory to resume from an earlier one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data")
COMMIT_MARKER = "commit_success.txt"  # orbax >= 0.12 writes it into every finished step
# Metadata files that must parse as JSON in a finished step (orbax's names).
METADATA_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata")
MAX_LISTED = 5  # tree differences named in an error message


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message names its directory."""


class Checkpointer:
    """Saves and restores (state, data) every `save_every` steps, keeping the last `keep`."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive int, got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Every save_every steps, or when JAX reports a preemption notice; no save of
            # the first step just because the directory is empty (orbax's default).
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            cleanup_tmp_directories=True,  # leftovers of killed saves
            enable_async_checkpointing=True,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                # Handlers named up front, so metadata of a step this process did not
                # save (a resumed run) can be read before restoring it.
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                },
            )
        except Exception as e:
            raise CheckpointError(f"{self.directory}: cannot open checkpoints ({e})") from e

    def should_save(self, step: int) -> bool:
        """True at multiples of save_every (and on preemption) past the last saved step."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data: dict, *, force: bool = False) -> bool:
        """Starts saving `step` if due (or `force`); returns whether a save was started.

        A step already on disk is not written again (a resumed run reaching the step it
        resumed from saves nothing).
        """
        _check_state(state)
        if not isinstance(data, dict):
            raise ValueError(f"data must be a dict, got {type(data).__name__}")
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data must be JSON-serialisable ({e})") from e
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        try:
            return bool(self._manager.save(step, args=args, force=force))
        except Exception as e:
            raise CheckpointError(f"{self._step_dir(step)}: save failed ({e})") from e

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"{self.directory}: a background save failed ({e})") from e

    def latest_step(self) -> int | None:
        """The newest step directory, checked to be complete; None when there is none.

        Unfinished saves (orbax's tmp directories) are not steps. A newest step directory
        that is not complete raises rather than falling back to an older step.
        """
        steps = self._steps_on_disk()
        if not steps:
            return None
        self._check_complete(steps[-1])
        return steps[-1]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data) of `step`; arrays land with `abstract_state`'s shardings and dtypes.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape` of the
        init with `sharding=` set) with the same structure and shapes as the saved state.
        """
        path = self._check_complete(step)
        self._check_tree(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore reports truncated/missing files as ValueError
            raise CheckpointError(f"{path}: cannot be restored ({_brief(e)})") from e
        if not isinstance(restored["data"], dict):
            raise CheckpointError(f"{path}: item 'data' is not a JSON object")
        return restored["state"], restored["data"]

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _steps_on_disk(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        names = os.listdir(self.directory)
        # Tmp dirs are named "<step>.orbax-checkpoint-tmp-<time>", so never all digits.
        return sorted(
            int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))
        )

    def _check_complete(self, step: int) -> str:
        """The step's directory, after checking what orbax needs to trust it."""
        path = self._step_dir(step)
        if not os.path.isdir(path):
            raise CheckpointError(
                f"{path}: no such checkpoint (steps on disk: {self._steps_on_disk()})"
            )
        if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
            raise CheckpointError(
                f"{path}: not a finished checkpoint ({COMMIT_MARKER}, orbax's commit marker, "
                f"is missing); delete the directory to resume from an earlier step"
            )
        for item in ITEMS:
            if not os.path.isdir(os.path.join(path, item)):
                raise CheckpointError(f"{path}: item '{item}' is missing")
        for name in METADATA_FILES:
            file = os.path.join(path, name)
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except FileNotFoundError as e:
                raise CheckpointError(f"{path}: metadata file {name} is missing") from e
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: metadata file {name} is not valid JSON") from e
        return path

    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """Same key paths and shapes as the saved state (dtypes may differ: orbax casts)."""
        path = self._step_dir(step)
        expected = _leaves_by_path(abstract_state)
        for key, leaf in expected.items():
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise ValueError(
                    f"abstract_state leaf {key or '<root>'} must be a jax.ShapeDtypeStruct, "
                    f"got {type(leaf).__name__}"
                )
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot be restored: the saved arrays are unreadable ({_brief(e)})"
            ) from e
        if metadata is None:
            raise CheckpointError(f"{path}: the state's metadata is missing")
        saved = _leaves_by_path(getattr(metadata, "tree", metadata))
        problems = []
        missing = [k for k in expected if k not in saved]
        unexpected = [k for k in saved if k not in expected]
        if missing:
            problems.append(f"not in the checkpoint: {_listed(missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not in abstract_state: {_listed(unexpected)}")
        shapes = [
            f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in saved and tuple(saved[k].shape) != tuple(v.shape)
        ]
        if shapes:
            problems.append(f"shapes differ (saved vs expected): {_listed(shapes)}")
        if problems:
            raise CheckpointError(
                f"{path}: the saved state does not match abstract_state; " + "; ".join(problems)
            )


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    # simple keys: a namedtuple field (optax states) and the dict key orbax saves it under
    # print the same.
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf for p, leaf in flat}


def _brief(e: Exception, limit: int = 600) -> str:
    """The exception without tensorstore's multi-kilobyte spec dump."""
    text = str(e).split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}"


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _check_state(state: Any) -> None:
    for key, leaf in _leaves_by_path(state).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise ValueError(
                f"state leaf {key} is a typed PRNG key; save jax.random.key_data(key) "
                f"(uint32) and rebuild it with jax.random.wrap_key_data after restoring"
            )
