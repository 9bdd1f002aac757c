"""How much device memory a compiled program needs, by XLA's own memory analysis.

XLA's buffer assignment fixes, at compile time, every buffer a program uses on its device; jax
exposes the totals as `compiled.memory_analysis()`. The memory plan (`experiments.memory_plan`),
the throughput and TPU-estimate benchmarks and the step-cost study (`analysis.step_cost`) all
read it through `compiled_memory`, so that "peak memory" means one thing wherever it is shown.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 1024.0**3


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """A compiled program's device memory, in bytes, as XLA's buffer assignment planned it.

    Attributes:
      argument_bytes: the inputs' buffers (for a train step: the state and the batch).
      output_bytes: the outputs' buffers (a tuple output adds XLA's small table of its elements).
      temp_bytes: scratch XLA allocates while the program runs (for a train step: mostly the
        activations kept for the backward pass).
      alias_bytes: arguments whose buffers an output reuses (donated arguments).
      generated_code_bytes: the compiled code itself, where the backend keeps it in device memory.
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries − aliased: every buffer the program's run needs on the
        device at once, a donated argument that an output reuses counted once; the same sum
        whatever the backend. The runtime's own allocations come on top (hence the memory plan's
        headroom)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def peak_gib(self) -> float:
        """`peak_bytes` in GiB (2**30 bytes)."""
        return self.peak_bytes / GIB

    def as_record(self) -> dict[str, int]:
        """XLA's own field names (`argument_size_in_bytes`, ...) plus `peak_estimate` (the peak in
        bytes): the form the results files of `experiments.reproduce` store."""
        return {"argument_size_in_bytes": self.argument_bytes, "output_size_in_bytes": self.output_bytes,
                "temp_size_in_bytes": self.temp_bytes, "alias_size_in_bytes": self.alias_bytes,
                "generated_code_size_in_bytes": self.generated_code_bytes, "peak_estimate": self.peak_bytes}


def compiled_memory(compiled: Any) -> CompiledMemory:
    """The memory analysis of `compiled` (a `jax.stages.Compiled`, e.g. `jit(f).lower(...).compile()`).

    Raises:
      ValueError: the backend gives no memory analysis (every backend this project runs on does).
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ValueError("this backend's compiled programs carry no memory analysis.")
    read = lambda field: int(getattr(analysis, field, 0) or 0)  # a field an older jaxlib lacks: 0
    return CompiledMemory(argument_bytes=read("argument_size_in_bytes"), output_bytes=read("output_size_in_bytes"),
                          temp_bytes=read("temp_size_in_bytes"), alias_bytes=read("alias_size_in_bytes"),
                          generated_code_bytes=read("generated_code_size_in_bytes"))
