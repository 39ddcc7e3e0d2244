"""KV memory accounting in fixed-size blocks, with prefix reuse by content hash.

Owns which blocks each sequence holds, the free list, reference counts and the prefix-cache index. It
holds no tensors: the runner maps block ids to storage. A full block of computed tokens is registered
under a hash chained over every token before it, so any later sequence whose prompt starts with the same
tokens finds those blocks and skips their computation. Blocks nobody holds keep their content (and
their hash) until the memory is needed, oldest first.
"""

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    """One sequence's blocks, in order; `num_hashed` leading blocks are registered in the prefix index."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    root: int = 0  # the hash chain's start: 0 for the base model, one per LoRA adapter (`adapter_root`)

    @property
    def num_hashed(self) -> int:
        return len(self.hashes)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used or unhashed, pop() = lowest
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but hashed, oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._block_of: dict[int, int] = {}  # hash -> block

    # -- accounting ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-unreferenced blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix reuse ----------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], table: BlockTable) -> int:
        """Attach the longest run of cached full blocks that starts `token_ids`; returns tokens reused.

        Never reuses the block holding the last token: its logits are needed, so it is computed.
        """
        assert not table.blocks
        parent = table.root
        usable = (len(token_ids) - 1) // self.block_size
        for i in range(usable):
            h = chain_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self._block_of.get(h)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(h)
            parent = h
        return len(table.blocks) * self.block_size

    def register_computed(self, token_ids: list[int], num_computed: int, table: BlockTable) -> None:
        """Index every newly completed full block, so later prompts can reuse it."""
        parent = table.hashes[-1] if table.hashes else table.root
        for i in range(table.num_hashed, num_computed // self.block_size):
            h = chain_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = table.blocks[i]
            if h not in self._block_of:  # an identical block computed twice keeps the first as canonical
                self._block_of[h] = block
                self._hash_of[block] = h
            table.hashes.append(h)
            parent = h

    # -- allocation ------------------------------------------------------------------------------------
    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make `table` hold `num_tokens` tokens. All or nothing: False (and no change) if memory is short."""
        extra = self.blocks_needed(num_tokens) - len(table.blocks)
        if extra > self.num_free_blocks:
            return False
        for _ in range(extra):
            table.blocks.append(self._fresh_block())
        return True

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks; hashed ones stay reusable until evicted. Reverse order, so a
        prompt's tail blocks are evicted before its head (the head is the likelier shared prefix)."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.hashes.clear()

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _fresh_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block


def chain_hash(parent: int, tokens: list[int]) -> int:
    return hash((parent, *tokens))


def adapter_root(ref: str) -> int:
    """The prefix chain of a LoRA adapter's sequences: their KV differs from the base's and from any other
    adapter's for the same tokens, so it is never shared across them."""
    return hash(("adapter", ref)) or 1
