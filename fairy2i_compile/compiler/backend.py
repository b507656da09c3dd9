"""The `fairy2i` torch.compile backend: capture -> passes -> AOTAutograd -> run.

    torch.compile(model, backend="fairy2i", options={"mode": "exact", ...})

Dynamo captures the FX graph and calls the backend with it (parameters arrive
as placeholder inputs, linears as `torch._C._nn.linear`). The backend

  1. validates the options into a `Fairy2iConfig`,
  2. runs the enabled passes of `passes.PIPELINE` on the Dynamo graph (linear
     layers are only recognisable before AOTAutograd lowers them to mm),
  3. hands the rewritten graph to AOTAutograd, which traces forward and
     backward graphs through the `fairy2i` ops' autograd formulas (what QAT
     trains through), and
  4. runs those graphs with the chosen `compiler`:
       "eager"    (default) the AOT graphs run op by op. On a 2-core CPU this
                  compiles a model in about a second, where Inductor takes
                  15-35 s per graph cold; the fairy2i ops are opaque library
                  calls either way, so the eager runner loses little for them.
                  In inference graphs, packed ops on CPU become direct calls of
                  the C++ kernel (passes.INFERENCE_PIPELINE, codegen/lower.py).
       "inductor" Inductor compiles everything around the fairy2i ops.

With `dump_dir` set, every stage's graph, what each pass changed, the forward
graph as MLIR and report.json are written there; with TORCH_TRACE set, the same
go to the structured trace (see `dump.py`). `Fairy2iBackend` instances also keep the reports in memory.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.fairy2i.*)
from .config import Fairy2iConfig
from .dump import GraphDumper, check_dump_dir, clear_previous_dump
from .passes import INFERENCE_PIPELINE, GraphPass, PassContext, enabled_passes, graph_fake_mode
from .report import GraphReport, summarize

__all__ = ["Fairy2iBackend", "compile", "fairy2i_backend"]

# Graphs compiled into each dump_dir by this process, so that several graphs
# (graph breaks, recompiles, several torch.compile calls) share one report.json.
_DUMP_GRAPHS: Dict[str, List[GraphReport]] = {}
_DUMP_LOCK = threading.Lock()


class Fairy2iBackend:
    """A torch.compile backend object that keeps what it did.

        backend = Fairy2iBackend({"mode": "exact"})
        compiled = torch.compile(model, backend=backend)
        compiled(x); backend.reports[0].converted()
    """

    def __init__(self, config: Union[Fairy2iConfig, Mapping[str, Any], None] = None):
        self.config = Fairy2iConfig.from_options(config)
        check_dump_dir(self.config.dump_dir)
        self.reports: List[GraphReport] = []
        self._warned_skip: set = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: List[Any]):
        config = self.config
        graph_id, dump_graphs = self._new_graph_id()
        report = GraphReport(graph=graph_id)
        dumper = GraphDumper(config.dump_dir, graph_id)
        ctx = PassContext(config=config, report=report, fake_mode=graph_fake_mode(gm), example_inputs=list(example_inputs))

        dumper.write("captured", gm, note=f"config: {config.to_dict()}")
        _run_passes(gm, enabled_passes(config), ctx, dumper)

        self.reports.append(report)
        self._warn_unmatched_skip(report)
        _warn_at_recompile_limit()
        if config.dump_dir is not None:
            with _DUMP_LOCK:
                dump_graphs.append(report)
        self._write_report(dumper, report, dump_graphs)  # before lowering: a failing lowering still leaves it
        compiled = _lower(gm, example_inputs, config, dumper, report)
        self._write_report(dumper, report, dump_graphs)  # with the MLIR export and the inference passes
        packed = report.counters.get("fuse_stages_fused", 0) + report.counters.get("fuse_stages_prepacked", 0)
        if packed and (config.dump_dir is not None or os.environ.get("TORCH_TRACE")):
            compiled = self._dump_kernels_after_first_call(compiled, dumper, report, dump_graphs)
        return compiled

    def _dump_kernels_after_first_call(self, compiled, dumper: GraphDumper, report: GraphReport, dump_graphs):
        """Kernels are built on first use: copy their sources into the dump once the graph has run."""
        done: List[bool] = []

        def run(*args):
            out = compiled(*args)
            if not done:
                done.append(True)
                dumper.copy_kernels(_kernel_sources(report), report)
                self._write_report(dumper, report, dump_graphs)
            return out

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
        return run

    def _warn_unmatched_skip(self, report: GraphReport) -> None:
        """Once per pattern: a `skip` pattern no layer of any graph so far matched (a typo, usually)."""
        unmatched = [p for p in summarize(self.reports, self.config.skip)["unmatched_skip_patterns"]
                     if p not in self._warned_skip]
        if not unmatched:
            return
        self._warned_skip.update(unmatched)
        names = [r.name for r in report.layers][:3]
        warnings.warn(
            f"fairy2i: skip pattern(s) {unmatched} matched no linear layer of the graph(s) compiled so far "
            f"({sum(len(r.layers) for r in self.reports)} layers, e.g. {names}); those layers are quantized. "
            f"Check for a typo: a pattern is an fnmatch pattern on module names such as 'lm_head', '*.q_proj'",
            UserWarning, stacklevel=2,
        )

    def _write_report(self, dumper: GraphDumper, report: GraphReport, dump_graphs) -> None:
        with _DUMP_LOCK:
            dumper.write_report(self.config.to_dict(), report, dump_graphs, self.config.skip)

    def _new_graph_id(self):
        if self.config.dump_dir is None:
            return len(self.reports), None
        key = os.path.abspath(self.config.dump_dir)
        with _DUMP_LOCK:
            if key not in _DUMP_GRAPHS:  # this process's first graph there: drop an earlier run's dump
                check_dump_dir(self.config.dump_dir)
                clear_previous_dump(self.config.dump_dir)
            graphs = _DUMP_GRAPHS.setdefault(key, [])
            return len(graphs), graphs


def _run_passes(gm: fx.GraphModule, passes: List[GraphPass], ctx: PassContext, dumper: GraphDumper) -> None:
    """Run `passes` on `gm` in order: lint + recompile after each, dump its graph and what it changed."""
    for graph_pass in passes:
        before = dumper.before_pass(gm, ctx.report)
        graph_pass.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        dumper.write(graph_pass.name, gm, note=f"counters after this pass: {ctx.report.counters}")
        dumper.after_pass(graph_pass.name, gm, before, ctx.report)


def _kernel_sources(report: GraphReport) -> List[str]:
    """Sources of the packed-op kernels this process has built so far (never imports triton);
    the C++ op registration's only when this graph calls it."""
    import sys

    from .codegen import cpu_packed

    sources = [str(cpu_packed.SOURCE)] if cpu_packed.cpu_kernel_library() is not None else []
    if report.counters.get("lowered_cpu_op"):
        sources.append(str(cpu_packed.OP_SOURCE))
    triton_mod = sys.modules.get("fairy2i_compile.compiler.codegen.triton_launch")
    if triton_mod is not None:
        sources += [str(p) for p in triton_mod.generated_sources()]
    return sources


# Inductor settings for inference graphs (compiler="inductor"): no per-call size/stride/alignment
# asserts. Inductor's Python wrapper would check every graph input and extern-kernel output on each
# call (817 checks in a SmolLM2-135M decode step, 1.4 of its 20.3 ms on a 2-core EPYC), which
# Dynamo's guards (inputs) and the ops' tested fake implementations (outputs) already cover.
# Training graphs keep Inductor's defaults. (A module constant so a benchmark can A/B it.)
INFERENCE_INDUCTOR_CONFIG: Dict[str, Any] = {"size_asserts": False, "alignment_asserts": False}


def _lower(gm: fx.GraphModule, example_inputs, config: Fairy2iConfig, dumper: GraphDumper, report: GraphReport):
    aot_index = dumper.next_index

    def inference_passes(graph: fx.GraphModule, inputs) -> None:
        # after the dump and MLIR export of the inference graph (they show the ops): CPU packed
        # layers -> the C++ op, other CPU packed ops -> direct kernel calls, the rest -> the twins
        ctx = PassContext(config=config, report=report, fake_mode=graph_fake_mode(graph), example_inputs=list(inputs))
        _run_passes(graph, enabled_passes(config, INFERENCE_PIPELINE), ctx, dumper)

    def dumping(stage: str, index: int, inner):
        def compiler(graph: fx.GraphModule, inputs, **kwargs):
            dumper.write(stage, graph, index=index)
            if stage != "aot_backward":
                dumper.export_mlir(stage, index, graph, inputs, report)
            return inner(graph, inputs, **kwargs)

        return compiler

    if config.compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph, inputs, **kwargs):
            backward = kwargs.get("is_backward", False)
            inference = kwargs.get("is_inference", False)
            stage = "aot_backward" if backward else ("aot_inference" if inference else "aot_forward")
            dumper.write(stage, graph, index=aot_index + int(backward))
            if not backward:
                dumper.export_mlir(stage, aot_index, graph, inputs, report)
            if not inference:
                return compile_fx_inner(graph, inputs, **kwargs)
            inference_passes(graph, inputs)
            patches = dict(INFERENCE_INDUCTOR_CONFIG)
            if config.cpp_wrapper:
                from torch._inductor.compile_fx import get_cpp_wrapper_config

                patches.update(get_cpp_wrapper_config(), cpp_wrapper=True, cpp_wrapper_build_separate=True)
                kwargs["cpp_wrapper"] = True
            with torch._inductor.config.patch(patches):
                return compile_fx_inner(graph, inputs, **kwargs)

        # AOTAutograd's cache would hand back a whole compiled graph without calling `inner`:
        # no lowering decisions for this process (C++ op available or not), no aot_* dumps,
        # no lowered_* counters. Inductor's own FX graph cache, keyed on the lowered graph
        # inside compile_fx_inner, still spares the code generation on a warm cache.
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def run_eager(graph, inputs, **kwargs):
        return make_boxed_func(graph.forward)

    def run_eager_inference(graph, inputs, **kwargs):
        inference_passes(graph, inputs)
        return make_boxed_func(graph.forward)

    return aot_autograd(
        fw_compiler=dumping("aot_forward", aot_index, run_eager),
        bw_compiler=dumping("aot_backward", aot_index + 1, run_eager),
        inference_compiler=dumping("aot_inference", aot_index, run_eager_inference),
    )(gm, example_inputs)


# --------------------------------------------------------------------------- Dynamo's recompile limit
# Dynamo keeps at most torch._dynamo.config.recompile_limit (8) compiled versions of one function
# (per module instance). Past that it stops calling the backend and runs the function as plain
# Python: the FP model, with one log line, for every later call of that function with any
# options (an option sweep over one model, or dynamic=False with more than 8 input shapes).
# The backend is not called then, so it cannot object; what it can do: warn when a compile
# fills the last slot, and offer `compile()`, whose calls turn that fallback into an error.
_RECOMPILE_LIMIT_FIX = (
    "call torch._dynamo.reset() before compiling the model with other options, pass dynamic=True (or mark the "
    "varying dimension dynamic) when inputs change shape, or raise torch._dynamo.config.recompile_limit"
)


def _warn_at_recompile_limit() -> None:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    dynamo = torch._dynamo.config
    if compile_id is None or compile_id.frame_compile_id is None or dynamo.fail_on_recompile_limit_hit:
        return
    if compile_id.frame_compile_id + 1 == dynamo.recompile_limit:
        warnings.warn(
            f"fairy2i: this is compile {dynamo.recompile_limit} of the same function since torch._dynamo.reset(), "
            f"Dynamo's recompile_limit. Past it Dynamo stops calling the backend and runs the plain full-precision "
            f"model, with only a log line. To avoid it: {_RECOMPILE_LIMIT_FIX}; or compile with "
            f"fairy2i_compile.compile(...), whose calls raise instead of running the FP model.",
            RuntimeWarning, stacklevel=2,
        )


def _fail_past_recompile_limit(fn):
    """`fn` (a torch.compile'd callable) whose calls raise RuntimeError where Dynamo would fall back
    to running the uncompiled code; torch's config is patched for the duration of each call only."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        dynamo = torch._dynamo.config
        if dynamo.suppress_errors:  # the user asked for eager fallbacks; torch refuses both flags at once
            return fn(*args, **kwargs)
        try:
            with dynamo.patch(fail_on_recompile_limit_hit=True):
                return fn(*args, **kwargs)
        except Exception as err:
            if not _is_recompile_limit_hit(err):
                raise
            raise RuntimeError(
                f"fairy2i: Dynamo's recompile limit ({dynamo.recompile_limit} compiled versions of one function) "
                f"was reached, so this call would have run the plain full-precision model instead of the Fairy2i "
                f"one. To fix: {_RECOMPILE_LIMIT_FIX}"
            ) from err

    return call


def _is_recompile_limit_hit(err: BaseException) -> bool:
    from torch._dynamo.exc import FailOnRecompileLimitHit

    while err is not None:
        if isinstance(err, FailOnRecompileLimitHit):
            return True
        err = err.__cause__ or err.__context__
    return False


def _generate_with(model: torch.nn.Module, forward, *args, **kwargs):
    """model.generate(...) with `forward` (the compiled forward) as the model's forward while it runs."""
    had = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = forward
    try:
        return model.generate(*args, **kwargs)
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def compile(model, options: Optional[Mapping[str, Any]] = None, **torch_compile_kwargs: Any):
    """`torch.compile(model, backend=Fairy2iBackend(options), **torch_compile_kwargs)` with two
    guarantees plain torch.compile cannot give:

    - a call that Dynamo would run uncompiled because its recompile limit was reached (an option
      sweep over one model, many input shapes with dynamic=False) raises RuntimeError saying so,
      instead of returning full-precision results; torch's config is patched only during each
      call (`fail_on_recompile_limit_hit`), nothing global changes;
    - for a model with `generate` (transformers), `compiled.generate(...)` generates with the
      compiled forward. Plain `torch.compile(model, ...).generate(...)` calls the original
      module's generate, whose forward is not compiled: the backend never runs and the text comes
      from the FP model. (Without this function: `model.forward = torch.compile(model.forward,
      backend="fairy2i", options=...)`, then `model.generate(...)`.)

    The backend is `compiled.fairy2i_backend` (its `reports`). While generate runs, the model's
    `forward` attribute is the compiled forward (not thread-safe).
    """
    if "backend" in torch_compile_kwargs:
        raise TypeError("fairy2i_compile.compile sets the backend itself; pass its options as options={...}")
    backend = Fairy2iBackend(options)
    compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
    if not isinstance(model, torch.nn.Module):
        guarded = _fail_past_recompile_limit(compiled)
        guarded.fairy2i_backend = backend  # type: ignore[attr-defined]
        return guarded
    compiled.forward = _fail_past_recompile_limit(compiled.forward)
    # object.__setattr__: OptimizedModule.__setattr__ would set these on the user's model
    if callable(getattr(model, "generate", None)):
        forward = _fail_past_recompile_limit(torch.compile(model.forward, backend=backend, **torch_compile_kwargs))
        object.__setattr__(compiled, "generate", functools.partial(_generate_with, model, forward))
    object.__setattr__(compiled, "fairy2i_backend", backend)
    return compiled


def fairy2i_backend(gm: fx.GraphModule, example_inputs: List[Any], *, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None):
    """Entry point behind `torch.compile(model, backend="fairy2i", options={...})`."""
    if mode is not None:
        raise ValueError(
            f"torch.compile(mode={mode!r}) is not used by the fairy2i backend; "
            f"pass fairy2i's own mode as options={{'mode': ...}} (one of exact/ptq/qat)"
        )
    return Fairy2iBackend(options)(gm, example_inputs)
