"""Scale-out profiling: data-parallel ranks under torchrun, exact reduction of their profiles, and the device-map
options of model loading across several devices (`parse_device_map`, `rank_max_memory` for `models.load_model`).

Data parallel (docs/scaling.md)::

    ctx = init_from_env()                 # None unless launched by torchrun (WORLD_SIZE > 1)
    device = rank_device(ctx, "auto")     # cuda:<LOCAL_RANK> on GPUs, else cpu
    merged = profile_distributed(model, batches, ctx, settings, ...)   # Profile on rank 0, None elsewhere

Sharding is by *batch*: every rank builds the same length-sorted batch stream from the same corpus (same token
budget, same order) and runs the forward only for batch j with j % world == rank. The union of the shards is the
single-process corpus batch for batch, so every per-token value is computed in the very same batch as in a
single-process run: histograms and counts of the merged profile equal the single-process ones exactly, moments to
float64 rounding (Chan merges in another order). Tokenizing the whole corpus on every rank is cheap next to the
forwards it saves.

Failure handling: a rank whose profiling raises publishes "rank R failed: ..." in the rendezvous store and exits
non-zero (torchrun then stops the others); ranks still running poll that key between batches and stop with the same
message; the final reduction starts with a collective status exchange, so no rank merges or writes unless every rank
finished. Rank 0 alone merges and returns the profile: the caller writes it, atomically.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .corpus import Batch
from . import Profile, ProfileError, ProfileSettings, ProgressEvent, merge_profiles, profile_model

# Ranks wait this long for each other in a collective. Generous by default: the final status exchange waits for the
# slowest rank to finish its shard. Fast failure comes from torchrun tearing the group down and the store flag.
DEFAULT_TIMEOUT_S = float(os.environ.get("SKIPPROF_DIST_TIMEOUT", 4 * 3600))
_FAILURE_KEY = "skipprof/failed"
DEVICE_MAP_PRESETS = ("auto", "balanced", "balanced_low_0", "sequential")


class DistributedError(RuntimeError):
    """A distributed run cannot go on (a rank failed, timed out, or the launch is misconfigured); one-line message."""


@dataclass
class DistContext:
    """This process's place in a torchrun launch, and the process groups it talks through."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    object_group: Any = None  # a gloo group for object collectives (the default group when it is gloo)
    store: Any = None  # rendezvous key-value store, for the failure flag; None when unavailable
    restart: int = 0  # torchrun restart count, so a restarted attempt ignores the previous attempt's flag
    _closed: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def failure_key(self) -> str:
        return f"{_FAILURE_KEY}/{self.restart}"

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        import torch.distributed as dist

        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()
        self._closed = True

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------------------
# Launch


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set; launch with torchrun "
                                   "(see docs/scaling.md)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def launched_distributed() -> bool:
    """True under torchrun (or an equivalent launcher) with more than one rank."""
    return _env_int("WORLD_SIZE", 1) > 1


def choose_backend(device_kind: str) -> str:
    """gloo on CPU; on GPUs NCCL for tensors with gloo beside it, so object collectives stay in host memory."""
    override = os.environ.get("SKIPPROF_DIST_BACKEND")
    if override:
        return override
    return "cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo"


def init_from_env(device: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext | None:
    """Join the torchrun process group described by the environment; None in a single-process run.

    `device` is the `--device` the user asked for ("auto", "cpu", "cuda"); it decides gloo vs NCCL.
    """
    import torch.distributed as dist

    if not launched_distributed():
        return None
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run single-process instead")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"environment variable {name} is not set; launch with torchrun "
                                   "(see docs/scaling.md)")
    kind = _device_kind(device)
    if kind == "cuda":
        if torch.cuda.device_count() == 0:
            raise DistributedError(f'`device="{device}"` was asked for but no GPU is visible to this rank')
        torch.cuda.set_device(rank_gpu_group(local_rank, local_world, torch.cuda.device_count())[0])
    backend = choose_backend(kind)
    timeout = _dt.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the process group ({backend}): {_first_line(e)}") from None
    object_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                      backend=backend, object_group=object_group, store=_default_store(),
                      restart=_env_int("TORCHELASTIC_RESTART_COUNT", 0))
    atexit.register(ctx.close)  # leave the group cleanly however the command ends
    return ctx


def _device_kind(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _default_store() -> Any:
    try:  # private, but stable for years; without it ranks still stop at the final status exchange
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def rank_device(ctx: DistContext | None, device: str | None = "auto") -> torch.device:
    """The device this rank profiles on: the first GPU of its block of the node's GPUs (GPU LOCAL_RANK when there is
    one rank per GPU), else the CPU."""
    kind = _device_kind(device)
    if kind != "cuda":
        return torch.device(device if device not in (None, "auto") else "cpu")
    if ctx is None:
        return torch.device(device if device not in (None, "auto") else "cuda")
    explicit = torch.device(device) if device not in (None, "auto") else None
    if explicit is not None and explicit.index is not None and ctx.world_size > 1:
        raise DistributedError(f'`device="{device}"` names one GPU, but {ctx.world_size} ranks would share it; '
                               'pass `device="cuda"` and each rank takes GPU LOCAL_RANK')
    return torch.device("cuda", rank_gpu_group(ctx.local_rank, ctx.local_world_size, torch.cuda.device_count())[0])


# -------------------------------------------------------------------------------------------------------------------
# Sharding


def shard(items: Iterable[Any], rank: int, world_size: int,
          before_each: Callable[[], None] | None = None) -> Iterator[Any]:
    """Item j of `items` goes to rank j % world_size; every rank walks the whole stream, so all see the same order.

    `before_each` runs before each item this rank keeps (the failure check).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    for index, item in enumerate(items):
        if index % world_size == rank:
            if before_each is not None:
                before_each()
            yield item


def shard_batches(batches: Iterable[Any], shard_of: tuple[int, int] | None) -> Iterable[Any]:
    """`--shard I/N` applied to a batch stream (unchanged when None)."""
    return batches if shard_of is None else shard(batches, *shard_of)


def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard I/N` (array jobs: this job profiles batch j when j % N == I) -> (I, N)."""
    parts = str(spec).split("/")
    try:
        index, count = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"ProfileSettings.shard {spec!r} is not I/N (e.g. 0/8 for the first of 8 jobs)") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"ProfileSettings.shard {spec}: I must be in 0..N-1 and N >= 1")
    return index, count


def rank_seed(seed: int, rank: int) -> int:
    """Reservoir seed of one rank: rank 0 keeps `seed`; the others get independent streams from (seed, rank)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


# -------------------------------------------------------------------------------------------------------------------
# Failure signalling


def publish_failure(ctx: DistContext, message: str) -> None:
    """Tell the other ranks this one failed (best effort: the store may already be gone)."""
    if ctx.store is None:
        return
    try:
        ctx.store.set(ctx.failure_key, message)
    except (RuntimeError, ValueError, OSError):
        pass


def peer_failure(ctx: DistContext) -> str | None:
    """The first failure another rank published, if any."""
    if ctx.store is None:
        return None
    try:
        if not ctx.store.check([ctx.failure_key]):
            return None
        return ctx.store.get(ctx.failure_key).decode("utf-8", "replace")
    except (RuntimeError, ValueError, OSError):
        return None


def raise_if_peer_failed(ctx: DistContext) -> None:
    message = peer_failure(ctx)
    if message is not None:
        raise DistributedError(f"rank {ctx.rank} stopped: {message}")


# -------------------------------------------------------------------------------------------------------------------
# Reduction


def _object_collective(ctx: DistContext, what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (RuntimeError, ValueError) as e:  # gloo: a peer died (connection closed) or the timeout expired
        published = peer_failure(ctx)
        reason = published if published is not None else f"a peer rank exited or timed out ({_first_line(e)})"
        raise DistributedError(f"rank {ctx.rank}: {what} failed: {reason}") from None


def exchange_status(ctx: DistContext, error: str | None) -> None:
    """Every rank says whether it finished; raises DistributedError on every rank if any rank failed."""
    import torch.distributed as dist

    statuses: list[Any] = [None] * ctx.world_size
    _object_collective(ctx, "the status exchange",
                       lambda: dist.all_gather_object(statuses, (ctx.rank, error), group=ctx.object_group))
    failures = [f"rank {rank}: {message}" for rank, message in statuses if message is not None]
    if failures:
        raise DistributedError("profiling failed on " + "; ".join(failures))


def gather_profiles(ctx: DistContext, profile: Profile) -> list[Profile] | None:
    """Every rank's profile, in rank order, on rank 0; None on the other ranks."""
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    _object_collective(ctx, "gathering the profiles",
                       lambda: dist.gather_object(profile, gathered, dst=0, group=ctx.object_group))
    return gathered


def combine_rank_profiles(profiles: Sequence[Profile], world_size: int, backend: str) -> Profile:
    """Merge the ranks' shard profiles into one profile of the whole corpus (exact; see merge_profiles).

    Ranks that got no batch (fewer batches than ranks) add nothing and are left out, so their empty document
    reservoirs do not shrink the merged one. The header is rank 0's corpus description (every rank read the same
    corpus), with the launch recorded under "distributed".
    """
    if not profiles:
        raise ProfileError("no rank profiles to combine")
    with_tokens = [p for p in profiles if int(np.asarray(p.token_count).sum()) > 0] or [profiles[0]]
    merged = merge_profiles(with_tokens) if len(with_tokens) > 1 else _copy_profile(with_tokens[0])
    header = dict(merged.header)
    header.pop("merged_from", None)
    header["partial"] = any(p.partial for p in profiles)
    header["corpus"] = list(profiles[0].header.get("corpus") or [])
    header["seed"] = profiles[0].header.get("seed")
    header["distributed"] = {
        "world_size": int(world_size), "backend": backend, "sharding": "batch j -> rank j % world_size",
        "rank_tokens": [{regime: int(np.asarray(p.token_count)[r].sum()) for r, regime in
                         enumerate(("prompt", "decode"))} for p in profiles],
        "reservoir_seeds": "rank 0: seed; rank r: SeedSequence([seed, r])",
    }
    merged.header = header
    return merged


def _copy_profile(p: Profile) -> Profile:
    return replace(p, header=dict(p.header))


def reduce_profile(ctx: DistContext | None, profile: Profile | None, error: str | None = None) -> Profile | None:
    """Collective: status exchange, then gather to rank 0 and merge. Returns the merged profile on rank 0 and None
    on the others; raises DistributedError on every rank if any rank reports an error or is gone."""
    if ctx is None or ctx.world_size == 1:
        if error is not None:
            raise DistributedError(error)
        return profile
    exchange_status(ctx, error)
    gathered = gather_profiles(ctx, profile)
    if not ctx.is_main:
        return None
    try:
        return combine_rank_profiles(gathered, ctx.world_size, ctx.backend)
    except ProfileError as e:
        raise DistributedError(f"the rank profiles cannot be merged: {e}") from None


# -------------------------------------------------------------------------------------------------------------------
# The data-parallel profiling loop


def profile_distributed(model: torch.nn.Module, batches: Iterable[Batch], ctx: DistContext | None,
                        settings: ProfileSettings | None = None,
                        class_names: Callable[[], list[str]] | list[str] | None = None, header: dict | None = None,
                        on_batch: Callable[[ProgressEvent], None] | None = None, eos_token_ids: Sequence[int] = (),
                        pad_token_id: int = 0) -> Profile | None:
    """`profile_model` on this rank's shard of `batches`, then the exact reduction to rank 0.

    Same arguments as `profile_model` (the model must already sit on `rank_device(ctx)`); with `ctx` None this is
    plain `profile_model`. Returns the merged profile on rank 0 (write it there, only there) and None on the other
    ranks. Any rank's failure raises DistributedError on every rank that is still alive; the failing rank also
    publishes it so the others stop at their next batch instead of finishing their shard.
    """
    settings = settings or ProfileSettings()
    if ctx is None or ctx.world_size == 1:
        return profile_model(model, batches, settings, class_names=class_names, header=header, on_batch=on_batch,
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    check = lambda: raise_if_peer_failed(ctx)  # noqa: E731

    def progress(event: ProgressEvent) -> None:
        check()
        if on_batch is not None:
            on_batch(event)

    rank_settings = replace(settings, seed=rank_seed(settings.seed, ctx.rank))
    try:
        mine = profile_model(model, shard(batches, ctx.rank, ctx.world_size, before_each=check), rank_settings,
                             class_names=class_names, header=header, on_batch=progress, eos_token_ids=eos_token_ids,
                             pad_token_id=pad_token_id)
    except DistributedError:
        raise  # a peer failed; it already told everyone
    except Exception as e:
        message = f"rank {ctx.rank} failed: {type(e).__name__}: {_first_line(e)}"
        publish_failure(ctx, message)
        raise DistributedError(message) from e
    mine.header["seed"] = settings.seed
    return reduce_profile(ctx, mine)


# -------------------------------------------------------------------------------------------------------------------
# Device maps: one model across several devices (accelerate)


def parse_device_map(spec: str | dict | None) -> str | dict[str, Any] | None:
    """`--device-map` value -> what `from_pretrained(device_map=...)` takes.

    auto | balanced | balanced_low_0 | sequential, a JSON object {"module.name": device, ...} inline, or the path of
    a .json file holding one. Devices: GPU index (int), "cuda:N", "cpu", "mps", "disk".
    """
    if spec is None or isinstance(spec, dict):
        return _check_device_map(spec) if isinstance(spec, dict) else None
    text = spec.strip()
    if text in DEVICE_MAP_PRESETS:
        return text
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"`device_map` is not valid JSON: {e}") from None
        return _check_device_map(value)
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"`device_map` file not found: {path}")
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"`device_map` file {path} is not valid JSON: {_first_line(e)}") from None
        return _check_device_map(value)
    raise ValueError(f"`device_map` {spec!r} is none of {', '.join(DEVICE_MAP_PRESETS)}, a JSON object or a "
                     ".json file")


def _check_device_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ValueError("`device_map` JSON must be a non-empty object mapping module names to devices")
    for name, device in value.items():
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise ValueError(f"`device_map`: device of {name!r} must be a GPU index or a string, got {device!r}")
        if isinstance(device, int) and device < 0:
            raise ValueError(f"`device_map`: GPU index of {name!r} is negative")
        if isinstance(device, str) and device not in ("cpu", "disk", "mps", "meta"):
            try:
                torch.device(device)
            except RuntimeError:
                raise ValueError(f"`device_map`: {device!r} (for {name!r}) is not a device") from None
        if device == "meta":
            raise ValueError(f"`device_map`: {name!r} on 'meta' would have no weights; use 'cpu' or 'disk'")
    return dict(value)


def rank_gpu_group(local_rank: int, local_world_size: int, gpu_count: int) -> list[int]:
    """GPUs a rank may spread its model over when several ranks share a node: a contiguous block of the node's GPUs
    (8 GPUs, 2 ranks -> rank 0 gets 0-3, rank 1 gets 4-7)."""
    if local_world_size < 1 or gpu_count < local_world_size:
        raise DistributedError(f"{local_world_size} ranks on this node but only {gpu_count} GPUs: each rank needs "
                               "at least one")
    per_rank = gpu_count // local_world_size
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def rank_max_memory(device_map: str | dict[str, Any] | None, ctx: DistContext | None) -> dict[int, int] | None:
    """`max_memory` for `models.load_model` under torchrun with a preset device map: each rank only fills its own
    block of the node's GPUs (`rank_gpu_group`), so data parallel and model splitting combine: 8 GPUs, 2 ranks per
    node -> each rank's replica spans 4 GPUs. The capture hooks then run on each layer's own device; only 4 floats per
    token and layer travel to the device where the histograms are kept. None (no bound) otherwise."""
    if not isinstance(device_map, str) or ctx is None or ctx.world_size <= 1 or not torch.cuda.is_available():
        return None
    gpus = rank_gpu_group(ctx.local_rank, ctx.local_world_size, torch.cuda.device_count())
    return {g: torch.cuda.get_device_properties(g).total_memory for g in gpus}


def hooked_devices(model: torch.nn.Module) -> set[str]:
    """Execution devices of the accelerate hooks on `model` (empty when accelerate did not dispatch it)."""
    devices: set[str] = set()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            device = getattr(h, "execution_device", None)
            if device is not None:
                devices.add(str(device))
    return devices


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def report_error(message: str) -> None:
    """One line on stderr, prefixed with the rank so interleaved torchrun output stays readable."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and launched_distributed() else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


__all__ = ["DistContext", "DistributedError", "init_from_env", "launched_distributed", "rank_device", "shard",
           "shard_batches", "parse_shard", "rank_seed", "profile_distributed", "reduce_profile",
           "combine_rank_profiles", "exchange_status", "gather_profiles", "publish_failure", "peer_failure",
           "parse_device_map", "rank_max_memory", "rank_gpu_group", "hooked_devices", "report_error"]
