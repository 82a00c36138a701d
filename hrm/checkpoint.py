"""The project's checkpoint directory format.

A checkpoint is a directory::

    config.json         {"format": "hrm-checkpoint", "format_version": 1,
                         "model": {ModelConfig fields}, "meta": {free-form: tokenizer, step, ...}}
    model.safetensors   the model's state dict (parameters and the z_L_init buffer)
    ema.safetensors     optional: the parameter EMA, same keys
    tokenizer.json      a copy of the Hugging Face tokenizer the model was trained with
                        (meta "tokenizer": "tokenizer.json"); absent for the byte tokenizer
    ...                 optional extra files (training writes its optimizer/loader state)

A *sharded* checkpoint (written by a training run under ``torchrun``, every rank writing
its own part) has the same ``config.json`` (its meta says ``"sharded": true``) and, in
place of the safetensors files, ``dcp/``: a ``torch.distributed.checkpoint`` directory
holding ``model``, ``optimizer`` (keyed by parameter name) and ``ema``, with each tensor's
global shape, so it loads into any number of ranks (DDP, FSDP2 or one process).
:func:`consolidate` turns it into the single-file form that ``hrm generate``,
``hrm export-hf`` and :func:`load_model` read.

Directories are written atomically: everything goes into a temporary sibling that is
renamed into place at the end, so a reader never sees a half-written checkpoint and a
kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hrm.config import ModelConfig
from hrm.errors import CheckpointError, HrmError

FORMAT = "hrm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
SHARDED_DIR = "dcp"
TOKENIZER_FILE = "tokenizer.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete directory ``tmp`` to ``path``, replacing what was there: the old
    directory is renamed aside first and deleted only once the new one is in place."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(path: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create directory ``path`` by calling ``fill(tmp_dir)`` and renaming ``tmp_dir`` into place.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced only after
    the new directory is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists and is not empty; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically; ``extra(tmp_dir)`` may add more files."""

    def fill(tmp: Path) -> None:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(), "meta": meta or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        save_file(_contiguous(state_dict), str(tmp / WEIGHTS_FILE))
        if ema_state_dict is not None:
            save_file(_contiguous(ema_state_dict), str(tmp / EMA_FILE))
        if extra is not None:
            extra(tmp)

    return write_dir_atomically(path, fill, overwrite=overwrite)


def read_json(file: Path) -> Any:
    """The JSON document in ``file``; unreadable JSON raises :class:`CheckpointError`."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` file; a missing or unreadable file raises :class:`CheckpointError`."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def model_shapes(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict a model of ``config`` has, as meta tensors: expected keys, shapes and dtypes."""
    from hrm.model import HRMText

    with torch.device("meta"):
        return HRMText(config).state_dict()


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, meta)`` of the checkpoint directory ``path``."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not an hrm checkpoint: {CONFIG_FILE} is missing")
    doc = read_json(file)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f'{file}: not an hrm checkpoint config (expected "format": "{FORMAT}")')
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unsupported format_version {doc.get('format_version')!r}")
    try:
        config = ModelConfig.from_dict(doc["model"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: bad model config ({e})") from None
    except HrmError as e:
        raise CheckpointError(f"{file}: {e}") from None
    return config, doc.get("meta", {})


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``expected``'s keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{where}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(state[key].shape)} but the config expects {tuple(ref.shape)}"
            )


def load_state(path: str | os.PathLike, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights (or, with ``ema``, the EMA weights) of checkpoint ``path``."""
    file = Path(path) / (EMA_FILE if ema else WEIGHTS_FILE)
    if is_sharded(path):
        raise CheckpointError(
            f"{path} is a sharded checkpoint (written under torchrun); convert it: hrm consolidate {path} --out DIR"
        )
    if not file.is_file():
        raise CheckpointError(f"{path}: {file.name} is missing")
    return read_safetensors(file)


def load_model(
    path: str | os.PathLike, *, ema: bool = False, backend: str | None = "torch", dtype: torch.dtype = torch.float32
):
    """Build the model a checkpoint describes and load its (or its EMA's) weights."""
    from hrm.model import HRMText

    config, _ = read_config(path)
    model = HRMText(config, backend=backend).to(dtype)
    state = load_state(path, ema=ema)
    check_state_dict(state, model.state_dict(), str(path))
    model.load_state_dict(state)
    return model


def load_checkpoint_tokenizer(path: str | os.PathLike, meta: dict[str, Any], override: str | None = None):
    """The tokenizer of checkpoint ``path``: ``override`` (``--tokenizer``) when given, else the
    one its ``meta`` records: ``"byte"``, the copy inside the checkpoint (``tokenizer.json``,
    relative to ``path``), or, for checkpoints written before tokenizers were copied in, the
    path recorded at training time."""
    from hrm.data import load_tokenizer

    if override is not None:
        return load_tokenizer(override)
    spec = meta.get("tokenizer", "byte")
    if spec == "byte":
        return load_tokenizer(spec)
    for candidate in (Path(path) / spec, Path(spec)):
        if candidate.is_file():
            return load_tokenizer(str(candidate))
    raise CheckpointError(
        f"{path}: the tokenizer it was trained with ({spec}) is not in the checkpoint nor at that path; "
        "pass --tokenizer PATH"
    )


LATEST_FILE = "latest"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint; for a training run directory, its latest checkpoint.

    A run directory keeps ``checkpoints/step_XXXXXXXX/`` and a text file
    ``checkpoints/latest`` naming the newest complete one.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / "checkpoints" / LATEST_FILE
    if latest.is_file():
        ckpt = latest.parent / latest.read_text().strip()
        if (ckpt / CONFIG_FILE).is_file():
            return ckpt
        raise CheckpointError(f"{latest} names {ckpt.name}, which is not a complete checkpoint")
    raise CheckpointError(
        f"{path} is neither a checkpoint (no {CONFIG_FILE}) nor a run directory with checkpoints/{LATEST_FILE}"
    )


# -- sharded checkpoints (torch.distributed.checkpoint) ----------------------------------------


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether checkpoint ``path`` is sharded (see the module docstring)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    path: str | os.PathLike,
    config: ModelConfig,
    state: dict[str, Any],
    *,
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    is_main: bool = True,
) -> Path:
    """Write a sharded checkpoint: every rank calls this with its ``state`` (``{"model": ...,
    "optimizer": ..., "ema": ...}``, as :mod:`torch.distributed.state_dict` gives them:
    DTensors are written shard by shard, replicated tensors once). Atomic like
    :func:`write_dir_atomically`: the ranks write into a temporary sibling that rank 0
    (``is_main``) completes with ``config.json`` and ``extra(tmp)`` and renames into place,
    replacing an existing ``path``. Every rank must see the same filesystem."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=tmp / SHARDED_DIR)
    if is_main:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": config.to_dict(),
            "meta": {**meta, "sharded": True},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        _move_into_place(tmp, path)
    _barrier()
    return path


def load_sharded(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Fill ``state`` (the structure :func:`save_sharded` took, from the loading run's own
    objects: any world size, DTensors or whole tensors) from sharded checkpoint ``path``;
    tensors are loaded in place. Every rank calls this; without a process group one process
    reads every shard."""
    import logging

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not is_sharded(path):
        raise CheckpointError(f"{path}: not a sharded checkpoint ({SHARDED_DIR}/ is missing)")

    # DCP logs a damaged file's tracebacks as warnings on the root logger; the error below names it
    def quiet(record: logging.LogRecord) -> bool:
        return "distributed/checkpoint" not in record.pathname.replace(os.sep, "/")

    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings():  # one process reading every shard is intended, not a slip
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=Path(path) / SHARDED_DIR, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps per-rank failures
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({reason})") from e
    finally:
        logging.getLogger().removeFilter(quiet)


def consolidate(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write sharded checkpoint ``path`` (or a run directory's latest) as a single-file
    checkpoint ``out`` (model and EMA weights, ``config.json`` with the same meta) in one
    process, with its tokenizer copy; the optimizer state stays behind (resume from the sharded one)."""
    path = resolve_checkpoint(path)
    config, meta = read_config(path)
    if not is_sharded(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint; it already is in the single-file form")
    shapes = model_shapes(config)
    state = {
        "model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()},
        "ema": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()},
    }
    load_sharded(path, state)
    meta = {k: v for k, v in meta.items() if k != "sharded"}
    tokenizer = path / TOKENIZER_FILE
    return save_checkpoint(
        out,
        config,
        state["model"],
        ema_state_dict=state["ema"],
        meta={**meta, "consolidated_from": str(path)},
        extra=(lambda tmp: shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)) if tokenizer.is_file() else None,
        overwrite=overwrite,
    )
