"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

``ring_additive_attention`` and ``ring_dot_product_attention`` take this rank's shard (dim 2) of global
``(B, H, L, D)`` tensors and return this rank's shard of the single-process result; key/value shards
travel around the ring (``batch_isend_irecv``, overlapped with the current block's kernel) and block
results merge by log-sum-exp. ``shard_sequence`` / ``unshard_sequence`` cut and reassemble the sequence
in the ``"contiguous"`` or ``"zigzag"`` layout. gloo on CPU, NCCL on GPU. See docs/ARCHITECTURE.md.
"""
from .ring import comm_wait_seconds, ring_additive_attention, ring_dot_product_attention
from .sharding import LAYOUTS, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "comm_wait_seconds",
    "ring_additive_attention",
    "ring_dot_product_attention",
    "shard_sequence",
    "unshard_sequence",
]
