"""Block swap for training: the frozen weights of N transformer blocks live in (pinned) host memory and visit the
device only while their block computes, forward and backward, so a 14B transformer trains on a 24 GB card.

How it stays correct in backward (where diffusers' group offloading fails: it moves weights back to the CPU when a
block's forward ends, before the backward or a checkpoint's recompute uses them):

- Eviction frees the storage of each frozen parameter (`untyped_storage().resize_(0)`) and points the parameter at
  an empty placeholder; the master copy stays in host memory. Onloading resizes the storage back, copies the master
  in and points the parameter at it again. Autograd's saved tensors share that storage, so a backward that reached
  an evicted block reads an empty storage and raises, and a forward multiplies by an empty placeholder and raises
  (a shape mismatch), on a CPU too; a tensor that kept its shape over an empty storage would crash the process.
- Forward: a block's pre-hook (every block's, swapped or not) evicts the swapped blocks before it, onloads it and
  prefetches the next one. Inside a backward (a gradient checkpoint's recompute) it only onloads: the recomputed
  graph needs the weights until the block's own backward has run.
- Backward: a block's backward pre-hook (its outputs' gradients are ready) onloads it and prefetches the block before
  it, and evicts the blocks after it, whose backward is complete by then: autograd runs nodes of later blocks (higher
  sequence numbers) before earlier ones.
- Only frozen parameters swap (their host copy never goes stale); LoRA and other trained weights stay resident.
- On CUDA the copies run on a side stream, the compute stream waits on an event per block, and the host copies are
  page-locked (`cudaHostRegister` on one buffer per block, exact in size), so the next block's weights arrive while
  this one computes. The device memory comes from the compute stream's pool. The swapped blocks are the first N: the last ones a
  backward needs, so the next forward starts with them resident.

`BlockSwap.resident_peak` and `BlockSwap.events` record what was resident when, for tests and the memory plan.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

# How many swapped blocks ahead are copied while one computes.
PREFETCH = 1


@dataclass
class _Swapped:
    """One swapped block: its frozen parameters and their host copies."""

    index: int
    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    masters: list[torch.Tensor]  # host copies
    views: list[torch.Tensor]  # on the device, sharing the storage that is resized (what autograd saves)
    placeholders: list[torch.Tensor]  # what each parameter holds while evicted: empty
    resident: bool = True
    ready: object = None  # the CUDA event its last copy recorded


def transformer_blocks(denoiser: torch.nn.Module, lists: tuple[str, ...]) -> list[torch.nn.Module]:
    """The denoiser's blocks in the order its forward runs them (the family names the module lists)."""
    return [block for name in lists for block in getattr(denoiser, name)]


def compile_blocks(blocks: list[torch.nn.Module], backend: str = "inductor") -> None:
    """`torch.compile` each block in place (`compile: blocks`): one compiled graph serves every block of a shape,
    and the code between blocks (embeddings, routing) stays eager."""
    for block in blocks:
        block.compile(backend=backend)


class BlockSwap:
    """Swap the frozen weights of the first `count` of `blocks` between host memory and `device` (see the module
    docstring). Install after the adapter is in place and before the denoiser moves to the device: the swapped
    blocks' frozen weights are moved to host memory here and never to the device by `.to()`."""

    def __init__(self, blocks: list[torch.nn.Module], count: int, device: torch.device):
        if not 1 <= count <= len(blocks):
            raise ValueError(f"blocks_to_swap: {count} is not between 1 and the model's {len(blocks)} blocks")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.swapped: dict[int, _Swapped] = {}
        self.events: list[tuple[str, int]] = []  # ("load" | "evict", block index), in order
        self.resident_peak = 0
        self.handles = []
        self.host = []  # one buffer per swapped block, page-locked on CUDA (see _host_buffer)
        for index, block in enumerate(blocks[:count]):
            params = [p for p in block.parameters() if not p.requires_grad]
            if not params:
                raise ValueError(
                    "offload: the swapped blocks have no frozen weights (a full fine-tune of every weight); "
                    "swap with full_modules set or with training_type=lora"
                )
            buffer, masters = _host_buffer(params, pinned=self.cuda)
            self.host.append(buffer)
            views, placeholders = [], []
            for param in params:
                views.append(_empty_like(param, self.device))
                placeholders.append(torch.empty(0, dtype=param.dtype, device=self.device))
                param.data = placeholders[-1]
            self.swapped[index] = _Swapped(index, block, params, masters, views, placeholders, resident=False)
        if self.cuda:
            self._finalizer = weakref.finalize(self, _unpin, list(self.host))
        for index, block in enumerate(blocks):
            self.handles += [
                block.register_forward_pre_hook(lambda module, args, i=index: self._before_forward(i)),
                block.register_full_backward_pre_hook(lambda module, grad, i=index: self._before_backward(i)),
            ]

    # --- what the hooks do --------------------------------------------------------------------------------------

    def _before_forward(self, index: int) -> None:
        if _in_backward():  # a recompute: onload only (the blocks after this one are done with)
            self._use(index)
            return
        self._keep(range(index, index + 1 + PREFETCH))
        self._use(index)
        for ahead in range(index + 1, index + 1 + PREFETCH):
            self._load(ahead)

    def _before_backward(self, index: int) -> None:
        # The blocks after this one are done: autograd runs later blocks' nodes first. (A backward through several
        # forwards' graphs, e.g. two experts' losses summed, starts again at the last block: the first goes then.)
        self._keep(range(index - PREFETCH, index + 1))
        self._use(index)
        for behind in range(index - 1, index - 1 - PREFETCH, -1):
            self._load(behind)

    # --- moving weights ------------------------------------------------------------------------------------------

    def _load(self, index: int) -> None:
        block = self.swapped.get(index)
        if block is None or block.resident:
            return
        if self.cuda:
            # The memory comes from the compute stream's pool (so activations can reuse it once freed); the copy
            # waits for the work queued so far, which may still read what that memory held before.
            compute = torch.cuda.current_stream(self.device)
            self._allocate(block)
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                self._fill(block, non_blocking=True)
                for view in block.views:
                    view.record_stream(self.stream)  # freed on eviction only after the copy is done
                block.ready = torch.cuda.Event()
                block.ready.record(self.stream)
        else:
            self._allocate(block)
            self._fill(block, non_blocking=False)
        block.resident = True
        self.events.append(("load", index))
        self.resident_peak = max(self.resident_peak, sum(b.resident for b in self.swapped.values()))

    @staticmethod
    def _allocate(block: _Swapped) -> None:
        for master, view in zip(block.masters, block.views):
            view.untyped_storage().resize_(master.numel() * master.element_size())

    @staticmethod
    def _fill(block: _Swapped, non_blocking: bool) -> None:
        for param, master, view in zip(block.params, block.masters, block.views):
            view.copy_(master, non_blocking=non_blocking)
            param.data = view

    def _use(self, index: int) -> None:
        """Make block `index` resident, and have the compute stream wait for its copy."""
        self._load(index)
        block = self.swapped.get(index)
        if block is not None and block.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
            block.ready = None

    def _keep(self, window: range) -> None:
        """Evict every resident swapped block outside `window`."""
        for index, block in self.swapped.items():
            if block.resident and index not in window:
                self._evict(index)

    def _evict(self, index: int) -> None:
        block = self.swapped.get(index)
        if block is None or not block.resident:
            return
        for param, view, placeholder in zip(block.params, block.views, block.placeholders):
            view.untyped_storage().resize_(0)
            param.data = placeholder
        block.resident = False
        self.events.append(("evict", index))

    # --- for the trainer ---------------------------------------------------------------------------------------

    def release(self) -> None:
        """The hooks removed and every swapped parameter pointed at its host copy: an ordinary module again, with the
        swapped weights on the host (to save a full fine-tune's weights)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for block in self.swapped.values():
            self._evict(block.index)
            for param, master in zip(block.params, block.masters):
                param.data = master.clone()  # ordinary host memory: the page-locked buffers are released
        if self.cuda:
            self._finalizer()
        self.host = []

    def frozen_names(self, denoiser: torch.nn.Module) -> list[str]:
        """The swapped parameters' names in `denoiser` (DDP must not broadcast them: they are empty while evicted)."""
        swapped = {id(p) for block in self.swapped.values() for p in block.params}
        return [name for name, p in denoiser.named_parameters() if id(p) in swapped]


def _host_buffer(params: list[torch.Tensor], pinned: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One host buffer holding copies of `params` (each at a 64-byte aligned offset) and a view of it per param.
    On CUDA it is page-locked with `cudaHostRegister`, so copies from it are asynchronous: `pin_memory()` would
    round each allocation up to a power of two (a 0.7 GB Wan block would take 1 GB)."""
    sizes = [p.numel() * p.element_size() for p in params]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // 64) * 64
    buffer = torch.empty(total, dtype=torch.uint8)
    masters = []
    for param, offset, size in zip(params, offsets, sizes):
        master = buffer[offset : offset + size].view(param.dtype).view(param.shape)
        master.copy_(param.detach())
        masters.append(master)
    if pinned:
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), total, 0)
        if int(error) != 0:
            raise RuntimeError(
                f"offload: page-locking {total / 2**30:.2f} GiB of host memory failed (CUDA error {error})"
            )
    return buffer, masters


def _unpin(buffers: list[torch.Tensor]) -> None:
    for buffer in buffers:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def _empty_like(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor of `param`'s shape and dtype on `device` whose storage holds nothing (until `_fill`)."""
    empty = torch.empty(param.shape, dtype=param.dtype, device=device)
    empty.untyped_storage().resize_(0)
    return empty


def _in_backward() -> bool:
    """Inside autograd's backward (a gradient checkpoint recomputing a block's forward)."""
    return torch._C._current_graph_task_id() != -1
