"""The compiled paged decode attention (service/model/kernels) equals the PyTorch path it replaces: keys and
values gathered through the block tables, then SDPA with a length mask."""

import pytest
import torch
import torch.nn.functional as F

from service.model import kernels

KERNEL = kernels.paged_attention()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the C++ kernel could not be built here (see the log)")


def reference(q, k_pool, v_pool, tables, lengths, block_size, scale):
    """q (B, H, D), pools (rows, H, D): each sequence's keys gathered, then SDPA in float32."""
    out = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        rows = torch.tensor([int(tables[b, t // block_size]) * block_size + t % block_size for t in range(n)])
        k, v = k_pool[rows].float().transpose(0, 1), v_pool[rows].float().transpose(0, 1)  # (H, n, D)
        out.append(F.scaled_dot_product_attention(q[b, :, None].float(), k, v, scale=scale)[:, 0])
    return torch.stack(out)


def case(dtype, seed, batch=6, heads=4, dim=64, block_size=4, num_blocks=40):
    g = torch.Generator().manual_seed(seed)
    pools = [torch.randn(num_blocks * block_size, heads, dim, generator=g).to(dtype) for _ in range(2)]
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    max_blocks = 8
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(batch)]).int()
    lengths = torch.tensor([1, 2, block_size, block_size + 1, max_blocks * block_size, 13][:batch]).int()
    return q, *pools, tables, lengths, block_size


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_equals_gather_then_sdpa(seed):
    q, k, v, tables, lengths, bs = case(torch.float32, seed)
    got = KERNEL.paged_decode_attention(q, k, v, tables, lengths, bs, 0.125)
    assert (got - reference(q, k, v, tables, lengths, bs, 0.125)).abs().max().item() <= 1e-5


@needs_kernel
def test_bfloat16_within_its_rounding():
    q, k, v, tables, lengths, bs = case(torch.bfloat16, 2)
    got = KERNEL.paged_decode_attention(q, k, v, tables, lengths, bs, 0.125)
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference(q, k, v, tables, lengths, bs, 0.125)).abs().max().item() <= 2e-2


@needs_kernel
def test_keys_past_a_sequence_length_are_not_read():
    q, k, v, tables, lengths, bs = case(torch.float32, 3)
    first = KERNEL.paged_decode_attention(q, k, v, tables, lengths, bs, 0.125)
    rows_in_use = {int(tables[b, t // bs]) * bs + t % bs for b in range(len(lengths)) for t in range(lengths[b])}
    unused = torch.tensor(sorted(set(range(k.shape[0])) - rows_in_use))
    k[unused], v[unused] = float("nan"), float("nan")
    assert torch.equal(KERNEL.paged_decode_attention(q, k, v, tables, lengths, bs, 0.125), first)


def test_decode_tables_equal_the_cache_index():
    """The small decode path's write rows, block tables and lengths are the cache index's for that step."""
    from service.model.attention import BatchLayout, cache_index, decode_tables

    layout = BatchLayout((1, 1), (6, 12), ((3, 1), (0, 5, 2, 7)))  # block size 4: 2 and 4 blocks
    write, tables, lengths = decode_tables(layout, 4)
    index = cache_index(layout, 4, torch.device("cpu"))
    assert torch.equal(write, index.write_rows) and write.tolist() == [1 * 4 + 2, 7 * 4 + 0]
    assert torch.equal(tables, index.decode.tables) and tables.tolist() == [[3, 1, 0, 0], [0, 5, 2, 7]]
    assert torch.equal(lengths, index.decode.lengths) and lengths.tolist() == [7, 13]
