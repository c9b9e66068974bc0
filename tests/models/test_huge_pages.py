"""Weights moved into huge pages (models/huge_pages.py): values, sharing and Parameter objects kept,
nothing moved twice, nothing moved where THP is off, and the fused decode step's results unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.models import huge_pages
from leanformer.models.huge_pages import huge_empty, thp_mode, to_huge_pages

needs_thp = pytest.mark.skipif(
    thp_mode() not in ("always", "madvise"), reason=f"no transparent huge pages here (mode {thp_mode()})"
)


class Net(nn.Module):
    """Large tensors in the shapes a model holds them: a Parameter two modules share (tied embeddings),
    buffers that are views of one storage, an int8 buffer, a small norm that must stay put."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(512, 128)
        self.head = nn.Linear(128, 512, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.proj = nn.Linear(256, 256)
        whole = torch.randn(2, 256, 128, generator=g)
        self.register_buffer("first", whole[0])  # two views of one storage
        self.register_buffer("second", whole[1])
        self.register_buffer("codes", torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=g))
        self.norm = nn.LayerNorm(128)


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@needs_thp
def test_moved_weights_keep_values_objects_and_sharing():
    net = Net()
    before, params = _snapshot(net), dict(net.named_parameters())
    norm_ptr = net.norm.weight.data_ptr()
    moved = to_huge_pages(net)
    assert moved >= (512 * 128 + 256 * 256) * 4 + 2 * 256 * 128 * 4 + 512 * 256
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(net.named_parameters()) == params  # the same Parameter objects
    assert net.head.weight is net.embed.weight  # still tied
    assert (
        net.first.untyped_storage().data_ptr() == net.second.untyped_storage().data_ptr()
    )  # still one storage
    assert net.second.data_ptr() - net.first.data_ptr() == 256 * 128 * 4
    assert net.norm.weight.data_ptr() == norm_ptr  # small: left where it was
    ((start, end),) = net._huge_pages
    assert all(start <= t.data_ptr() < end for t in (net.embed.weight, net.proj.weight, net.codes, net.first))
    assert to_huge_pages(net) == 0  # nothing new
    net.proj.weight = nn.Parameter(torch.randn(256, 256))  # a compression swapping one tensor
    assert to_huge_pages(net) == 256 * 256 * 4  # only that one moves
    copied = copy.deepcopy(net)  # a deep copy's tensors are elsewhere: they move again
    assert to_huge_pages(copied) > 0 and torch.equal(copied.codes, net.codes)


@needs_thp
@pytest.mark.parametrize("made_in_inference_mode", [False, True])
def test_moved_under_inference_mode_keep_their_kind(made_in_inference_mode):
    """Moved inside inference_mode (a decode plan built in generate), normal tensors stay normal (loadable,
    trainable, writable afterwards) and inference tensors stay inference ones (a Parameter's .data cannot
    change kind)."""
    with torch.inference_mode(made_in_inference_mode):
        net = Net()
    x = torch.randint(0, 512, (3,))
    with torch.inference_mode(made_in_inference_mode):
        want = net.head(net.embed(x))
    with torch.inference_mode():
        assert to_huge_pages(net) > 0
    tensors = [*net.parameters(), *net.buffers()]
    assert all(t.is_inference() is made_in_inference_mode for t in tensors)
    with torch.inference_mode(made_in_inference_mode):
        assert torch.equal(net.head(net.embed(x)), want)
    if not made_in_inference_mode:
        net.load_state_dict(net.state_dict())
        net.proj.weight.data.mul_(2)


@needs_thp
def test_the_block_gets_huge_pages():
    block = huge_empty(8 << 20)
    assert block.data_ptr() % (2 << 20) == 0 and block.numel() == 8 << 20
    block.fill_(1)
    start = block.data_ptr()
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):  # the mapping holding the block: its AnonHugePages line
        if "-" in line.split()[0] and int(line.split("-")[0], 16) <= start < int(
            line.split()[0].split("-")[1], 16
        ):
            huge = next(ln for ln in lines[i + 1 :] if ln.startswith("AnonHugePages:"))
            break
    assert int(huge.split()[1]) > 0, "madvise(MADV_HUGEPAGE) gave no huge pages (THP defrag off?)"


def test_nothing_moves_without_thp(monkeypatch):
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "never")
    net = Net()
    ptr = net.proj.weight.data_ptr()
    assert to_huge_pages(net) == 0 and net.proj.weight.data_ptr() == ptr and huge_empty(1 << 20) is None
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: None)  # not Linux
    assert to_huge_pages(net) == 0


def test_a_mapping_that_fails_leaves_everything_in_place(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    net = Net()
    ptr = net.proj.weight.data_ptr()
    assert to_huge_pages(net) == 0 and net.proj.weight.data_ptr() == ptr


def test_meta_and_opaque_tensors_are_left_alone():
    net = Net()
    net.register_buffer("meta", torch.empty(512, 512, device="meta"))
    if torch.backends.mkldnn.is_available():  # oneDNN-packed weights: torch gives no storage to move
        net.register_buffer("packed", torch.randn(256, 256).to_mkldnn())
    to_huge_pages(net)  # no error; those stay as they were
    assert net.meta.is_meta and (not hasattr(net, "packed") or net.packed.is_mkldnn)


@needs_thp
def test_a_decoder_decodes_the_same_from_huge_pages(tiny_dirs, monkeypatch):
    """The tiny decoders' tensors are below MIN_BYTES: move them all, then the fused step (built after
    the move) must give the module path's greedy tokens and logits."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 1)
    model, _ = lf.load(tiny_dirs["llama"])
    assert getattr(model, "_huge_pages", None), "load() moves the weights"
    ((start, end),) = model._huge_pages
    assert start <= model.model.layers[0].mlp.down_proj.weight.data_ptr() < end
    plain, _ = lf.load(tiny_dirs["llama"])
    plain.fused_decode = False
    ids = [[3, 14, 15, 92, 65, 35]]
    got = lf.generate(model, None, ids, max_new_tokens=8, ignore_eos=True)
    want = lf.generate(plain, None, ids, max_new_tokens=8, ignore_eos=True)
    assert got == want


@needs_thp
def test_a_large_kv_cache_lies_in_huge_pages():
    from leanformer.models.kv_cache import KVCache

    cache = KVCache(4, 1, 4096, 2, 64)  # 2 MB per layer's K or V: 16 MB in all
    base = cache.k[0].data_ptr()
    assert base % (2 << 20) == 0 and cache.v[0].data_ptr() == base + (2 << 20)  # K0, V0, K1, ...
    assert cache.k[1].data_ptr() == base + (4 << 20) and all(
        float(t.abs().sum()) == 0 for t in cache.k + cache.v
    )
    assert huge_pages.huge_zeros(8, (1, 2, 64, 64), torch.float32) is None  # 256 KB: ordinary memory


@needs_thp
def test_a_large_paged_pool_lies_in_huge_pages():
    from leanformer.models.paged_cache import PagedKVCache

    cache = PagedKVCache(4, 2, 4096, 2, 64, num_blocks=255, block_size=16)  # (255 + 1) blocks x 8 KB = 2 MB
    base = cache.k_pool[0].data_ptr()
    assert base % (2 << 20) == 0 and cache.v_pool[0].data_ptr() == base + (2 << 20)  # K0, V0, K1, ...
    assert cache.k_pool[3].data_ptr() == base + (12 << 20)
    assert all(float(t.abs().sum()) == 0 for t in cache.k_pool + cache.v_pool)
    small = PagedKVCache(2, 1, 64, 2, 64, num_blocks=4, block_size=16)  # 80 KB: a tensor each
    assert small.k_pool[0].untyped_storage().data_ptr() != small.v_pool[0].untyped_storage().data_ptr()


@needs_thp
def test_paged_decoding_with_the_pools_in_huge_pages_gives_the_same_logits(tiny_dirs, monkeypatch):
    from leanformer.models import paged_cache
    from tests.models.test_fused_tokens import decode

    model, _ = lf.load(tiny_dirs["llama"])
    want = decode(model, monkeypatch, tokens_path=True, paged=True)
    made = []

    def every_pool(*args, **kwargs):  # the tiny model's pools are far under the 4 MB threshold
        made.append(huge_pages.huge_zeros(*args, **{**kwargs, "min_bytes": 1}))
        return made[-1]

    monkeypatch.setattr(paged_cache, "huge_zeros", every_pool)
    assert torch.equal(decode(model, monkeypatch, tokens_path=True, paged=True), want)
    assert made and all(m is not None for m in made)


@needs_thp
def test_decoding_with_the_kv_cache_in_huge_pages_gives_the_same_tokens(tiny_dirs, monkeypatch):
    import functools

    from leanformer.models import kv_cache

    model, _ = lf.load(tiny_dirs["llama"])
    ids = [[3, 14, 15, 92, 65, 35], [2, 71, 82, 81, 8, 28]]
    want = lf.generate(model, None, ids, max_new_tokens=8, ignore_eos=True)
    made = []

    def every_cache(*args, **kwargs):  # the tiny model's cache is far under the 4 MB threshold
        made.append(functools.partial(huge_pages.huge_zeros, min_bytes=1)(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(kv_cache, "huge_zeros", every_cache)
    assert lf.generate(model, None, ids, max_new_tokens=8, ignore_eos=True) == want
    assert made and all(m is not None for m in made)


def test_weights_moved_by_a_plan_built_under_inference_mode_stay_normal_tensors(tiny_dirs, monkeypatch):
    """A quantized model's new buffers move into huge pages when generate builds its decode plan, inside
    inference_mode: they must stay normal tensors, or the model could not be loaded into, trained or
    written in place afterwards ("Inplace update to inference tensor outside InferenceMode")."""
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 1)
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.compress.Int4WeightOnly(group_size=32))
    sd = copy.deepcopy(model.state_dict())
    prompt = torch.arange(3, 43)[None]  # past DECODE_MAX_ROWS: the module path's prefill
    with torch.no_grad():
        want = model(prompt)
    before = model._huge_pages if hasattr(model, "_huge_pages") else []
    lf.generate(model, None, [[3, 14, 15]], max_new_tokens=2, ignore_eos=True)
    assert model._huge_pages != before, "generate's plan moved the quantized buffers"
    assert not any(t.is_inference() for t in [*model.buffers(), *model.parameters()])
    model.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(model(prompt), want)
