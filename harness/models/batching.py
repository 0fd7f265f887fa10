"""Batches without padding: requests share a batch only when their prompts have the same token length.

Left padding changes a row's positions, its attention mask and the shapes its GEMMs run at, so a padded row is not
computed as it would be alone; with fake quantization those float-level differences become different answers. When
every row of a batch has the same length there is nothing to pad: each row sees the positions, masks and
per-sequence attention shapes it sees at batch size 1, and the row-invariant linear kernels
(`qvlm_harness.models.invariance`) do the rest. Results go back in request order whatever order batches run in.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# The adapter encodes requests ahead of their batches until the encodings (ids, masks, pixel values) reach this many
# bytes, so batches form across a whole window of requests while memory stays bounded.
ENCODING_WINDOW_BYTES = 256 * 2**20


def same_length_batches(lengths: Sequence[int], batch_size: int, *,
                        keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of at most `batch_size` (at least 1) that share one length (and
    one `keys` value when given), longest prompts first so a memory problem shows on the first batch; indices
    keep request order within a group."""
    size = max(1, int(batch_size))
    groups: dict[tuple, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault((int(n), None if keys is None else keys[i]), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[1][0]))
    return [idx[start:start + size] for _, idx in ordered for start in range(0, len(idx), size)]

