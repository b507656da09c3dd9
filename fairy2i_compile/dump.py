"""Readable dumps of every pipeline stage's graph.

Layout under `dump_dir` (one folder per graph Dynamo captures; most models are
one graph):

    report.json                       config, summary, one entry per linear layer
    graph_0/00_captured.py            the Dynamo FX graph as the backend received it
    graph_0/01_widely_linear.py       after each pass, numbered in pipeline order
    graph_0/02_aot_forward.py         AOTAutograd's forward (or _inference) graph
    graph_0/03_aot_backward.py        and its backward, when training

Each file is the graph's `print_readable()` code with a header naming the stage.
Files are written atomically.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.fx as fx

from .report import atomic_write_text

__all__ = ["GraphDumper"]


class GraphDumper:
    def __init__(self, dump_dir: Optional[str], graph_id: int):
        self.root = dump_dir
        self.dir = os.path.join(dump_dir, f"graph_{graph_id}") if dump_dir else None
        self.graph_id = graph_id
        self.next_index = 0

    def stage_path(self, index: int, stage: str) -> Optional[str]:
        return os.path.join(self.dir, f"{index:02d}_{stage}.py") if self.dir else None

    def write(self, stage: str, gm: fx.GraphModule, note: str = "", index: Optional[int] = None) -> Optional[str]:
        """Write `gm` as stage number `index` (default: the next number)."""
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        path = self.stage_path(index, stage)
        if path is None:
            return None
        code = gm.print_readable(print_output=False, include_stride=False, include_device=True)
        header = f"# fairy2i_compile dump: graph {self.graph_id}, stage {index:02d} '{stage}'\n"
        if note:
            header += "".join(f"# {line}\n" for line in note.splitlines())
        atomic_write_text(path, header + "\n" + code)
        return path
