"""Process groups, sequence layouts, ``shard_sequence`` / ``unshard_sequence``, and argument agreement.

A sequence of length ``L`` is cut into ``n`` equal chunks: ``n = P`` for ``"contiguous"`` (rank ``r``
holds chunk ``r``), ``n = 2P`` for ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2P - 1 - r``, in
that order, so that each rank gets one early and one late chunk and causal work is balanced). A length
that ``n`` does not divide is a ``ValueError``: pad the sequence to a multiple of ``n`` and pass the true
lengths as ``key_lengths`` (padded keys are then masked; drop the padded query rows of the output).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class GroupInfo:
    """This process's view of a process group (``group is None`` when running without torch.distributed)."""

    group: Optional[object]
    rank: int
    size: int

    def comm_device(self, like: Optional[Tensor] = None) -> torch.device:
        """Where small control tensors must live for this group's backend (cuda for NCCL, else cpu)."""
        if self.group is None:
            return torch.device("cpu")
        if "nccl" in str(dist.get_backend(self.group)).lower():
            if like is not None and like.is_cuda:
                return like.device
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def group_info(group) -> GroupInfo:
    """Validate ``group`` and return this rank's index and the group size.

    ``group=None`` means the default group; without an initialized default group it means a
    single process (world size 1). Raises ``ValueError`` for anything that is not a process
    group this process belongs to.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if group is None:
        if not initialized:
            return GroupInfo(None, 0, 1)
        group = dist.group.WORLD
    elif not initialized:
        raise ValueError(f"group={group!r} was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on a rank outside it
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group "
                         f"(torch.distributed.new_group returned NON_GROUP_MEMBER here)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be None or a torch.distributed.ProcessGroup, "
                         f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group "
                         f"(global ranks {dist.get_process_group_ranks(group)})")
    return GroupInfo(group, rank, dist.get_world_size(group))


def check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")


def n_chunks(P: int, layout: str) -> int:
    return P if layout == "contiguous" else 2 * P


def chunk_ids(rank: int, P: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices rank ``rank`` holds, in the order they appear in its shard."""
    return (rank,) if layout == "contiguous" else (rank, 2 * P - 1 - rank)


def check_length(L: int, P: int, layout: str, what: str = "sequence") -> int:
    """The chunk length ``L / n_chunks``; ``ValueError`` naming ``L`` and ``P`` when it is not whole."""
    n = n_chunks(P, layout)
    if L % n != 0:
        need = "P" if layout == "contiguous" else "2P"
        raise ValueError(f"{what} length {L} is not divisible by {need} = {n} (P = {P} ranks, "
                         f"layout={layout!r}); pad it to a multiple of {n} and mask the padding with "
                         f"key_lengths")
    return L // n


def shard_sequence(x: Tensor, *, dim: int = 2, group=None, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a new tensor, not a view).

    Local slicing, no communication. ``"contiguous"``: chunk ``rank`` of ``P``; ``"zigzag"``: chunks
    ``rank`` and ``2P - 1 - rank`` of ``2P``, concatenated. ``ValueError`` if the length along ``dim``
    is not divisible by ``P`` (contiguous) or ``2P`` (zigzag). Differentiable.
    """
    check_layout(layout)
    info = group_info(group)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}")
    c = check_length(x.shape[dim], info.size, layout)
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(info.rank, info.size, layout)]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].clone()


def unshard_sequence(x_local: Tensor, *, dim: int = 2, group=None, layout: str = "zigzag") -> Tensor:
    """The full tensor from every rank's shard (``all_gather``), in sequence order; the inverse of
    ``shard_sequence``. A collective: every rank of the group must call it. Not differentiable.

    Shards of different shapes on different ranks are a ``ValueError`` on every rank.
    """
    check_layout(layout)
    info = group_info(group)
    if not isinstance(x_local, Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    if not -x_local.dim() <= dim < x_local.dim():
        raise ValueError(f"dim={dim} is out of range for x_local of shape {tuple(x_local.shape)}")
    dim = dim % x_local.dim()
    x_local = x_local.detach()
    if info.size == 1:
        return x_local.clone()
    fields = {"x_local.dim()": x_local.dim(), "x_local.dtype": dtype_code(x_local.dtype)}
    fields.update({f"x_local.shape[{i}]": s for i, s in enumerate(x_local.shape)})
    agree(info, None, fields, what="unshard_sequence")
    m = len(chunk_ids(0, info.size, layout))
    if x_local.shape[dim] % m != 0:
        raise ValueError(f"unshard_sequence: the shard length {x_local.shape[dim]} along dim {dim} is not "
                         f"divisible by the {m} chunks per rank of layout={layout!r}")
    c = x_local.shape[dim] // m
    gathered = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(info.size)]
    dist.all_gather(gathered, x_local.contiguous(), group=info.group)
    chunks: list[Optional[Tensor]] = [None] * n_chunks(info.size, layout)
    for r, shard in enumerate(gathered):
        for j, cid in enumerate(chunk_ids(r, info.size, layout)):
            chunks[cid] = shard.narrow(dim, j * c, c)
    return torch.cat(chunks, dim=dim)


# ------------------------------------------------------------------------ agreement across ranks

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def float_bits(x: Optional[float]) -> int:
    """A float as an int64 bit pattern (``-1`` for None), so it can travel in an integer tensor."""
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def agree(info: GroupInfo, local_error: Optional[BaseException], fields: dict, what: str,
          like: Optional[Tensor] = None) -> None:
    """Make every rank of the group reach the same verdict on a call's arguments.

    Each rank contributes an error flag and integer ``fields`` (shapes, options); one small
    ``all_gather`` later every rank knows whether any rank rejected its arguments or whether
    the ranks disagree, and raises: the local exception on a rank that had one, a
    ``ValueError`` naming the offending ranks (and their message) elsewhere. Called before any
    other communication, so bad input never leaves a rank waiting for a peer that gave up.
    """
    if info.size == 1:
        if local_error is not None:
            raise local_error
        return
    names = list(fields)
    vec = torch.tensor([int(local_error is not None)] + [int(fields[n]) for n in names], dtype=torch.int64,
                       device=info.comm_device(like))
    out = [torch.empty_like(vec) for _ in range(info.size)]
    dist.all_gather(out, vec, group=info.group)
    table = torch.stack(out).cpu()
    bad = [r for r in range(info.size) if table[r, 0] != 0]
    if bad:
        msgs: list = [None] * info.size
        dist.all_gather_object(msgs, None if local_error is None else f"{type(local_error).__name__}: "
                               f"{local_error}", group=info.group)
        if local_error is not None:
            raise local_error
        detail = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
        raise ValueError(f"{what}: rank(s) {bad} of the group rejected their arguments ({detail})")
    diff = [n for i, n in enumerate(names) if (table[:, i + 1] != table[0, i + 1]).any()]
    if diff:
        per_rank = "; ".join(f"{n}: {table[:, names.index(n) + 1].tolist()}" for n in diff)
        raise ValueError(f"{what}: the ranks of the group disagree on {per_rank} (values per rank); "
                         f"every rank must pass shards of the same shape and the same options")

