"""Where every benchmark writes its results: `<out>.json` (the numbers, for tools) and `<out>.md`
(the table, for people), both atomically, so an interrupted run never leaves a half-written
results file beside a committed one."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fairy2i_compile.cache import atomic_write_text  # noqa: E402


def cpu_description() -> str:
    """'x86_64 AMD EPYC (family 23 model 1, AVX2)': the CPU that ran a benchmark, for its results file.

    The model name, family and model come from /proc/cpuinfo (this project's VMs change between
    runs, and platform.processor() says only 'x86_64' on Linux); the vector level is what torch's
    CPU kernels were dispatched to."""
    import torch

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor()
    family = f"family {fields['cpu family']} model {fields['model']}, " if "cpu family" in fields and "model" in fields else ""
    return f"{platform.machine()}{' ' + name if name else ''} ({family}{torch.backends.cpu.get_cpu_capability()})"


def json_safe(x: Any) -> Any:
    """inf / nan -> their names as strings, so the JSON stays strict and nothing is lost."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_results(out: Path | str, payload: Any, markdown: str, indent: int = 1) -> Tuple[Path, Path]:
    """Write `payload` as strict JSON (non-finite floats become strings) and `markdown` beside it.

    `out` may end in .json or .md or in neither; both files share its stem."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write_text(json_path, json.dumps(json_safe(payload), indent=indent, allow_nan=False) + "\n")
    atomic_write_text(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def publish(out: Path | str, payload: Any, lines: list, notes: str = "", indent: int = 1) -> str:
    """The markdown `lines` (+ a Notes section when `notes`) written beside `payload` (write_results),
    printed, and returned."""
    text = "\n".join(list(lines) + (["", "## Notes", "", notes] if notes else [])) + "\n"
    write_results(out, payload, text, indent=indent)
    print(text, end="")
    return text
