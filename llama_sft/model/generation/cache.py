"""A KV-cache layer that grows in place and drops rows and columns without copying it whole."""
from __future__ import annotations

import functools


@functools.cache
def growing_cache_layer_class():
    """A DynamicLayer that appends into preallocated room instead of concatenating, and removes
    rows and leading columns without copying the whole cache.

    On CPU, copying the whole cache at every decode step (``torch.cat`` in DynamicLayer.update,
    and again whenever a finished row is dropped) cost more than the model's matmuls at batch 64.
    Keys and values are views ``storage[:rows, :, start:end]``; whoever replaces them (e.g.
    DynamicLayer.batch_select_indices) makes the next update copy them into new storage.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        HEADROOM = 64         # positions allocated ahead, so storage is regrown every 64 steps
        storage: tuple = ()   # (keys, values) storage: [rows, heads, positions, head_dim]
        start = 0             # first storage position in use

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length, n = self.get_seq_length(), key_states.shape[-2]
            if not self._owns_views() or self.start + length + n > self.storage[0].shape[2]:
                if length:
                    self.adopt(self.keys, self.values, room=n)
                else:                               # DynamicLayer starts from a 1-d empty tensor
                    self.adopt(key_states[:, :, :0], value_states[:, :, :0], room=n)
            end = self.start + length
            rows = key_states.shape[0]
            for room, new in zip(self.storage, (key_states, value_states)):
                room[:rows, :, end:end + n] = new
            self._view(rows, end + n)
            return self.keys, self.values

        def adopt(self, keys, values, room: int = 0) -> None:
            """Copy keys and values into new storage with room for ``room`` + HEADROOM more."""
            self.storage = tuple(t.new_empty((t.shape[0], t.shape[1],
                                              t.shape[2] + room + self.HEADROOM, t.shape[3]))
                                 for t in (keys, values))
            for store, t in zip(self.storage, (keys, values)):
                store[:, :, :t.shape[2]] = t
            self.start = 0
            self._view(keys.shape[0], keys.shape[2])

        def move_rows(self, holes, movers, rows: int) -> None:
            """Copy rows ``movers`` into rows ``holes`` and keep the first ``rows`` rows."""
            end = self.start + self.get_seq_length()
            if holes:
                for store in self.storage:
                    used = store[:, :, self.start:end]
                    used[holes] = used[movers]
            self._view(rows, end)

        def drop_columns(self, count: int) -> None:
            """Forget the first ``count`` positions (no row attends to them any more)."""
            end = self.start + self.get_seq_length()
            self.start += count
            self._view(self.keys.shape[0], end)

        def _view(self, rows: int, end: int) -> None:
            self.keys, self.values = (s[:rows, :, self.start:end] for s in self.storage)

        def _owns_views(self) -> bool:
            return bool(self.storage) and all(
                t.data_ptr() == s[:, :, self.start:].data_ptr() and t.stride() == s.stride()
                for t, s in zip((self.keys, self.values), self.storage))

    return GrowingLayer
