"""Tests for hf_hydra.growing_cache: a growing layer holds exactly what transformers' DynamicLayer holds after any
sequence of the operations the decoding loops and `generate` apply, appends without copying the cache, and a model
computes the same logits on it (bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from hf_hydra.cache_name import cache_argument, output_cache
from hf_hydra.growing_cache import ROOM_TOKENS, GrowingLayer, grow_in_place, growing_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, H, D = 2, 3, 8  # batch, KV heads, head size of the layer tests


def _states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=generator), torch.randn(B, H, n, D, generator=generator)  # (B, H, n, d)


def _same(growing: GrowingLayer, plain: DynamicLayer) -> None:
    assert growing.get_seq_length() == plain.get_seq_length()
    if plain.keys is None:  # after reset
        assert growing.keys is None and growing.values is None
        return
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)


def _compact(layer: DynamicLayer, start: int, rows: list[int]) -> None:
    """What the tree loop's `keep_accepted` does to a layer: rows moved down in place, the rest cropped."""
    moved = torch.tensor(rows)
    for name in ("keys", "values"):
        tensor = getattr(layer, name)
        tensor[..., start : start + len(rows), :] = tensor[..., moved, :]
    layer.crop(-(layer.get_seq_length() - start - len(rows)))


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_through_every_operation():
    growing, plain = GrowingLayer(), DynamicLayer()
    steps = [
        lambda layer: layer.update(*_states(40, 0)),  # prefill
        lambda layer: layer.update(*_states(1, 1)),  # one-token decoding
        lambda layer: layer.update(*_states(7, 2)),  # a tree
        lambda layer: _compact(layer, 41, [43, 46]),  # keep two of its nodes
        lambda layer: layer.update(*_states(ROOM_TOKENS, 3)),  # past the buffer's room: a move
        lambda layer: layer.crop(-5),
        lambda layer: layer.batch_select_indices(torch.tensor([1])),  # a finished row leaves: new tensors
        lambda layer: layer.update(*(s[:1] for s in _states(3, 4))),
        lambda layer: layer.crop(-layer.get_seq_length()),  # emptied, then filled again
        lambda layer: layer.update(*(s[:1] for s in _states(2, 5))),
        lambda layer: layer.reset(),
        lambda layer: layer.update(*_states(3, 6)),
    ]
    for step in steps:
        step(growing)
        step(plain)
        _same(growing, plain)


def test_appends_write_behind_the_cached_entries_and_move_only_when_the_room_is_used_up():
    layer = GrowingLayer()
    layer.update(*_states(10, 0))
    start = layer.keys.data_ptr()
    for step in range(ROOM_TOKENS // 4):
        layer.update(*_states(4, step + 1))
        assert layer.keys.data_ptr() == start and layer.values.data_ptr() == layer.value_buffer.data_ptr()
    assert layer.get_seq_length() == 10 + ROOM_TOKENS  # exactly the room
    layer.update(*_states(1, 99))
    assert layer.keys.data_ptr() != start  # moved, with room again
    assert layer.key_buffer.shape[-2] - layer.get_seq_length() == ROOM_TOKENS


def test_a_deep_copy_is_independent_of_the_original():
    layer = GrowingLayer()
    layer.update(*_states(5, 0))
    snapshot = layer.keys.clone()
    copied = copy.deepcopy(layer)
    copied.update(*_states(3, 1))
    copied.keys[..., 0, :] = 0.0
    assert torch.equal(layer.keys, snapshot)
    assert copied.keys.data_ptr() == copied.key_buffer.data_ptr()  # the copy still appends in place


def test_grow_in_place_turns_only_full_attention_layers_and_refuses_a_filled_cache():
    cache = DynamicCache()
    assert cache.layer_class_to_replicate is DynamicLayer
    assert grow_in_place(cache) is cache and cache.layer_class_to_replicate is GrowingLayer
    mixed = DynamicCache()
    mixed.layer_class_to_replicate = None
    mixed.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]
    grow_in_place(mixed)
    assert [type(layer) for layer in mixed.layers] == [GrowingLayer, DynamicSlidingWindowLayer]
    filled = DynamicCache()
    filled.update(*_states(2, 0), layer_idx=0)
    with pytest.raises(ValueError, match="empty cache; this one holds 2 entries"):
        grow_in_place(filled)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_a_model_computes_the_same_logits_on_a_growing_cache(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randint(model.config.vocab_size, (1, n), generator=generator) for n in (30, 1, 5, 1, 300)]
    caches = {"plain": DynamicCache(config=model.config), "growing": growing_cache(model.config)}
    with torch.no_grad():
        for chunk in chunks:
            logits = {
                name: model(input_ids=chunk, **cache_argument(cache), use_cache=True).logits
                for name, cache in caches.items()
            }
            assert torch.equal(logits["plain"], logits["growing"])
            caches["growing"].crop(-1)  # as the tree loop drops rejected nodes
            caches["plain"].crop(-1)
    assert all(type(layer) is GrowingLayer for layer in caches["growing"].layers)
    assert output_cache(model(input_ids=chunks[1], **cache_argument(caches["growing"]))) is caches["growing"]
