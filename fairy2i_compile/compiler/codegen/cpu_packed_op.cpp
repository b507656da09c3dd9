// fairy2i::packed_linear_cpu: the CPU kernel of cpu_packed.cpp registered as the CPU
// implementation of a torch.library op, so a compiled graph calls it through the dispatcher
// straight into C++ (~40 us less per call than a Python implementation; codegen/lower.py).
//
// fairy2i::ptq_packed_linear_cpu: the same for the stage-fused PTQ op (a dense weight `a`
// whose packed codes live in the PTQ cache, ops/ptq_cache.py). The cache stays in Python, the
// one place that packs; this file keeps, per slot, the weight key it was packed for
// (data_ptr, _version, shape, dtype) and WEAK references to the codes and scales. A call
// whose key matches and whose codes are still alive runs without Python; anything else
// (first call, an in-place update of the weight, a freed or replaced cache entry) asks
// Python through the op fairy2i::ptq_pack_slot, which returns the cache's tensors (packing
// them if the weight changed). Weak references: freeing the parameter frees its codes.
//
// fairy2i::packed_linear_cpu_multi.n{k} / ptq_packed_linear_cpu_multi.n{k}: k sibling layers on the
// same activations in one call (passes/fuse_siblings.py); one boxed kernel per family below.
//
// The op's schema, its fake implementation and a Python fallback (the same kernel through
// ctypes) live in ops/packed.py and ops/ptq_packed.py; this file only adds the CPU kernel. It computes exactly
// what cpu_packed.py's cpu_forward computes, with the same paths and thresholds:
//   M <= lut8_max_tokens, tensor or row scales, FAIRY2I_CPU_LUT8=1 (AVX2): fairy2i_lut8_linear on a
//                         cached transposed copy of the codes (lut8_layout_for); here only, since
//                         the copy needs a cache that outlives the call;
//   M <  gemm_min_tokens: fairy2i_packed_linear (fold when M <= fold_max_tokens, for tensor,
//                         row and word-aligned group scales; LUT for tensor scales up to
//                         lut_max_tokens; else 4-row decode + dot products);
//   M >= gemm_min_tokens: fairy2i_decode_rows in blocks of `block_rows` rows + at::mm.
// The thresholds come from cpu_packed.py as -D definitions at build time, so that file stays
// their one source of truth (they are part of the build's cache key).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu_packed.cpp"

namespace {

#if !defined(FAIRY2I_FOLD_MAX_TOKENS) || !defined(FAIRY2I_GEMM_MIN_TOKENS) || !defined(FAIRY2I_BLOCK_BYTES) || \
    !defined(FAIRY2I_LUT_MAX_TOKENS) || !defined(FAIRY2I_LUT8_MAX_TOKENS)
#error "build through fairy2i_compile.codegen.cpu_packed, which defines the thresholds"
#endif
constexpr int64_t g_fold_max_tokens = FAIRY2I_FOLD_MAX_TOKENS;
constexpr int64_t g_gemm_min_tokens = FAIRY2I_GEMM_MIN_TOKENS;
constexpr int64_t g_lut_max_tokens = FAIRY2I_LUT_MAX_TOKENS;
constexpr int64_t g_lut8_max_tokens = FAIRY2I_LUT8_MAX_TOKENS;
constexpr int64_t g_block_bytes = FAIRY2I_BLOCK_BYTES;

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// The lut8 path's transposed copy of a codes tensor (cpu_packed.cpp, fairy2i_lut8_layout), made
// on the first lut8 call with those codes and kept while they live. Keyed by the codes'
// TensorImpl and checked against a WEAK reference to it, its data pointer, _version and shape, so
// an in-place update (PackedLinear.load_packed), a freed tensor or a new one at the same address
// rebuilds the copy instead of reading a stale one; entries whose codes are gone are dropped at
// the next build. Inference tensors (no version counter) never take the path.
struct Lut8Entry {
  WeakTensor codes;
  const void* ptr;
  int64_t version;
  std::vector<int64_t> sizes;
  at::Tensor layout;
};

std::mutex g_lut8_mutex;
std::unordered_map<const c10::TensorImpl*, Lut8Entry> g_lut8;

at::Tensor lut8_layout_for(const at::Tensor& codes) {
  std::lock_guard<std::mutex> lock(g_lut8_mutex);
  const c10::TensorImpl* impl = codes.unsafeGetTensorImpl();
  auto it = g_lut8.find(impl);
  if (it != g_lut8.end()) {
    const Lut8Entry& e = it->second;
    auto alive = e.codes.lock();
    if (alive.defined() && alive.get() == impl && e.ptr == codes.data_ptr() && e.version == codes._version() &&
        codes.sizes() == e.sizes)
      return e.layout;
  }
  for (auto jt = g_lut8.begin(); jt != g_lut8.end();)
    jt = jt->second.codes.expired() ? g_lut8.erase(jt) : std::next(jt);
  const int64_t P = codes.size(0), n = codes.size(1), KW = codes.size(2);
  at::Tensor layout = at::empty({fairy2i_lut8_layout_bytes(P, n, KW)}, codes.options().dtype(at::kByte));
  fairy2i_lut8_layout(codes.data_ptr<int32_t>(), P, n, KW, layout.data_ptr<uint8_t>());
  g_lut8.insert_or_assign(impl, Lut8Entry{WeakTensor(codes.getIntrusivePtr()), codes.data_ptr(), codes._version(),
                                          codes.sizes().vec(), layout});
  return layout;
}

// Whether a layer's M-token batch takes the lut8 path (opt-in): tensor or row scales, decode-sized,
// codes that can key the layout cache. One check for packed_linear_cpu and packed_linear_cpu_multi.
bool lut8_serves(int64_t M, const at::Tensor& codes, const at::Tensor& scales) {
  return M > 0 && M <= g_lut8_max_tokens && lut8_enabled() && scales.size(3) == 1 &&
         (scales.size(2) == 1 || scales.size(2) == codes.size(1)) && codes.is_contiguous() && !codes.is_inference();
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& codes_in, const at::Tensor& scales_in,
                             const std::optional<at::Tensor>& bias_in, int64_t m, int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && codes_in.device().is_cpu(),
              "fairy2i.packed_linear_cpu needs CPU tensors, got ", x.device());
  TORCH_CHECK(codes_in.dim() == 3 && codes_in.scalar_type() == at::kInt,
              "fairy2i.packed_linear_cpu: codes must be int32 [P, n, KW], got ", codes_in.sizes(), " ",
              codes_in.scalar_type());
  TORCH_CHECK(x.size(-1) == 2 * m, "fairy2i.packed_linear_cpu: activations must have last dim 2*m = ", 2 * m,
              ", got ", x.sizes());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t P = codes.size(0), n = codes.size(1), KW = codes.size(2);
  const int64_t n_s = scales.size(2), G = scales.size(3);
  const int64_t M = m > 0 ? xf.numel() / (2 * m) : 0;
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = 2 * n;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();

  at::Tensor y;
  if (M >= g_gemm_min_tokens) {
    const at::Tensor x2 = xf.reshape({M, 2 * m});
    y = at::empty({M, 2 * n}, xf.options());
    const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(n, g_block_bytes / (2 * 2 * m * 4)));
    at::Tensor block = at::empty({2, rows, 2 * m}, xf.options());
    for (int64_t j0 = 0; j0 < n; j0 += rows) {
      const int64_t j1 = std::min(n, j0 + rows), R = j1 - j0;
      at::Tensor blk = R == rows ? block : at::empty({2, R, 2 * m}, xf.options());
      fairy2i_decode_rows(codes.data_ptr<int32_t>(), P, n, KW, m, scales.data_ptr<float>(), n_s, G, group_size,
                          j0, j1, blk.data_ptr<float>(), nthreads);
      const at::Tensor out = at::mm(x2, blk.view({2 * R, 2 * m}).t());  // [M, 2R]: Re rows, then Im rows
      y.slice(1, j0, j1).copy_(out.slice(1, 0, R));
      y.slice(1, n + j0, n + j1).copy_(out.slice(1, R, 2 * R));
    }
    if (bias.defined()) y.add_(bias);
    y = y.view(out_shape);
  } else {
    y = at::empty(out_shape, xf.options());
    // lut8 (opt-in): tensor or row scales, decode-sized batches, codes that can key the layout cache
    if (lut8_serves(M, codes_in, scales) &&
        fairy2i_lut8_linear(xf.data_ptr<float>(), M, m, lut8_layout_for(codes_in).data_ptr<uint8_t>(), P, n, KW,
                            scales.data_ptr<float>(), n_s, bias.defined() ? bias.data_ptr<float>() : nullptr,
                            y.data_ptr<float>(), nthreads))
      return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    if (M > 0)
      fairy2i_packed_linear(xf.data_ptr<float>(), M, m, codes.data_ptr<int32_t>(), P, n, KW,
                            scales.data_ptr<float>(), n_s, G, group_size,
                            bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                            M <= g_fold_max_tokens ? 1 : M <= g_lut_max_tokens ? 4 : 0, nthreads);  // cpu_packed.fold_mode
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// packed_linear_cpu_multi: several packed layers that read the same activations (q/k/v,
// gate/up; passes/fuse_siblings.py groups them), one call. Where every layer takes the lut8 path
// (same conditions as packed_linear_cpu), one lut8_linear_layers call serves them all: the block
// maxima and the row-scale tables are built once per token, and the row blocks of all layers share
// one parallel region. Otherwise each layer runs packed_linear_cpu. Either way every output is
// bit-identical to that layer's packed_linear_cpu call.
std::vector<at::Tensor> packed_linear_cpu_multi(const at::Tensor& x, at::TensorList codes, at::TensorList scales,
                                                const c10::List<std::optional<at::Tensor>>& bias, int64_t m,
                                                at::IntArrayRef group_size) {
  const int64_t nl = (int64_t)codes.size();
  TORCH_CHECK(nl >= 1 && (int64_t)scales.size() == nl && (int64_t)bias.size() == nl &&
                  (int64_t)group_size.size() == nl,
              "fairy2i.packed_linear_cpu_multi: codes, scales, bias and group_size need one entry per layer, got ",
              codes.size(), ", ", scales.size(), ", ", bias.size(), ", ", group_size.size());
  TORCH_CHECK(x.size(-1) == 2 * m, "fairy2i.packed_linear_cpu_multi: activations must have last dim 2*m = ", 2 * m,
              ", got ", x.sizes());
#if FAIRY2I_HAVE_LUT8
  const int64_t M = m > 0 ? x.numel() / (2 * m) : 0;
  bool lut8 = x.device().is_cpu();
  for (int64_t l = 0; lut8 && l < nl; ++l) {
    const at::Tensor& c = codes[l];
    lut8 = c.device().is_cpu() && c.dim() == 3 && c.scalar_type() == at::kInt && c.size(2) == codes[0].size(2) &&
           scales[l].dim() == 4 && lut8_serves(M, c, scales[l]);
  }
  if (lut8) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    std::vector<at::Tensor> keep, ys;  // float32 scales / bias / layouts alive for the call
    std::vector<Lut8Layer> layers;
    for (int64_t l = 0; l < nl; ++l) {
      const at::Tensor& c = codes[l];
      const int64_t n = c.size(1);
      at::Tensor sc = scales[l].to(at::kFloat).contiguous(), lt = lut8_layout_for(c), b;
      const std::optional<at::Tensor> bl = bias.get(l);
      if (bl.has_value() && bl->defined()) b = bl->to(at::kFloat).contiguous();
      std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
      out_shape.back() = 2 * n;
      ys.push_back(at::empty(out_shape, xf.options()));
      layers.push_back({lt.data_ptr<uint8_t>(), c.size(0), n, sc.data_ptr<float>(), sc.size(2),
                        b.defined() ? b.data_ptr<float>() : nullptr, ys.back().data_ptr<float>()});
      keep.insert(keep.end(), {sc, lt, b});
    }
    if (lut8_linear_layers(xf.data_ptr<float>(), M, m, codes[0].size(2), layers.data(), nl, at::get_num_threads())) {
      if (x.scalar_type() != at::kFloat)
        for (auto& y : ys) y = y.to(x.scalar_type());
      return ys;
    }
  }
#endif
  std::vector<at::Tensor> ys;
  for (int64_t l = 0; l < nl; ++l) ys.push_back(packed_linear_cpu(x, codes[l], scales[l], bias.get(l), m, group_size[l]));
  return ys;
}

struct PtqEntry {
  const void* ptr;
  int64_t version;
  std::vector<int64_t> sizes;
  c10::ScalarType dtype;
  WeakTensor codes, scales;
  int64_t group_size;
};

std::mutex g_ptq_mutex;
std::unordered_map<int64_t, PtqEntry> g_ptq;

bool ptq_lookup(int64_t slot, const at::Tensor& a, at::Tensor& codes, at::Tensor& scales, int64_t& group_size) {
  std::lock_guard<std::mutex> lock(g_ptq_mutex);
  auto it = g_ptq.find(slot);
  if (it == g_ptq.end()) return false;
  const PtqEntry& e = it->second;
  if (e.ptr != a.data_ptr() || e.version != a._version() || e.dtype != a.scalar_type() || a.sizes() != e.sizes)
    return false;
  auto c = e.codes.lock();
  auto s = e.scales.lock();
  if (!c.defined() || !s.defined()) return false;  // the Python cache dropped or replaced them
  codes = at::Tensor(std::move(c));
  scales = at::Tensor(std::move(s));
  group_size = e.group_size;
  return true;
}

// The codes, scales and group size of PTQ weight `a` in `slot`: from the weak references while the
// weight key matches, else packed through Python (fairy2i::ptq_pack_slot, the PTQ cache) and recorded.
void ptq_resolve(const at::Tensor& a, int64_t slot, int64_t stages, const std::string& granularity,
                 const std::string& name, at::Tensor& codes, at::Tensor& scales, int64_t& group_size) {
  if (slot >= 0 && ptq_lookup(slot, a, codes, scales, group_size)) return;
  static const c10::OperatorHandle pack = c10::Dispatcher::singleton().findSchemaOrThrow("fairy2i::ptq_pack_slot", "");
  torch::jit::Stack stack{c10::IValue(a), c10::IValue(slot), c10::IValue(stages), c10::IValue(granularity),
                          c10::IValue(name)};
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // packing records no gradient
    pack.callBoxed(&stack);
  }
  codes = stack[0].toTensor();
  scales = stack[1].toTensor();
  group_size = stack[2].toInt();
  if (slot >= 0) {
    std::lock_guard<std::mutex> lock(g_ptq_mutex);
    g_ptq.insert_or_assign(slot, PtqEntry{a.data_ptr(), a._version(), a.sizes().vec(), a.scalar_type(),
                                          WeakTensor(codes.getIntrusivePtr()), WeakTensor(scales.getIntrusivePtr()),
                                          group_size});
  }
}

void check_ptq_shapes(const at::Tensor& x, const at::Tensor& a, const std::string& name) {
  TORCH_CHECK(a.dim() == 2 && x.size(-1) == a.size(1), "fairy2i.ptq_packed_linear_cpu (", name, "): activations ",
              x.sizes(), " do not match the weight ", a.sizes());
}

at::Tensor ptq_packed_linear_cpu(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& bias,
                                 int64_t slot, int64_t stages, c10::string_view granularity, c10::string_view name) {
  check_ptq_shapes(x, a, std::string(name));
  at::Tensor codes, scales;
  int64_t group_size = 0;
  ptq_resolve(a, slot, stages, std::string(granularity), std::string(name), codes, scales, group_size);
  return packed_linear_cpu(x, codes, scales, bias, a.size(1) / 2, group_size);
}

// The overloads packed_linear_cpu_multi.n{k} and ptq_packed_linear_cpu_multi.n{k} (k = 2 ..
// FAIRY2I_MULTI_MAX) return k tensors (a fixed tuple, not Tensor[]: Inductor's C++ wrapper calls an
// op whose returns are plain tensors through the dispatcher, a Tensor[] one through Python). One
// boxed kernel per family serves every k; the schema's return count must equal the layer count.
void push_outputs(const c10::OperatorHandle& op, torch::jit::Stack* stack, std::vector<at::Tensor>&& ys) {
  TORCH_CHECK(ys.size() == op.schema().returns().size(), "fairy2i.", op.schema().name(), ".",
              op.schema().overload_name(), " returns ", op.schema().returns().size(), " outputs, but got ", ys.size(),
              " layers; call the overload n", ys.size());
  for (auto& y : ys) torch::jit::push(*stack, std::move(y));
}

// List arguments read element by element: Inductor's C++ wrapper boxes them as generic lists whose
// element type is a freshly made type object, which the typed accessors (toOptionalTensorList,
// toIntVector, ...) refuse by pointer comparison.
std::vector<at::Tensor> tensors_of(const c10::IValue& v) {
  std::vector<at::Tensor> out;
  for (const c10::IValue& e : v.toListRef()) out.push_back(e.toTensor());
  return out;
}

c10::List<std::optional<at::Tensor>> optional_tensors_of(const c10::IValue& v) {
  c10::List<std::optional<at::Tensor>> out;
  for (const c10::IValue& e : v.toListRef()) out.push_back(e.isNone() ? std::nullopt : std::optional<at::Tensor>(e.toTensor()));
  return out;
}

std::vector<int64_t> ints_of(const c10::IValue& v) {
  std::vector<int64_t> out;
  for (const c10::IValue& e : v.toListRef()) out.push_back(e.toInt());
  return out;
}

void multi_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 6);
  const at::Tensor x = args[0].toTensor();
  const std::vector<at::Tensor> codes = tensors_of(args[1]), scales = tensors_of(args[2]);
  const c10::List<std::optional<at::Tensor>> bias = optional_tensors_of(args[3]);
  const int64_t m = args[4].toInt();
  const std::vector<int64_t> group_size = ints_of(args[5]);
  std::vector<at::Tensor> ys = packed_linear_cpu_multi(x, codes, scales, bias, m, group_size);
  torch::jit::drop(*stack, 6);
  push_outputs(op, stack, std::move(ys));
}

// (x, a[], bias[], slot[], stages[], granularity[], name[]): each weight's codes from the PTQ
// cache (ptq_resolve), then packed_linear_cpu_multi, so the outputs equal each layer's
// ptq_packed_linear_cpu call exactly.
void ptq_multi_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 7);
  const at::Tensor x = args[0].toTensor();
  const std::vector<at::Tensor> a = tensors_of(args[1]);
  const c10::List<std::optional<at::Tensor>> bias = optional_tensors_of(args[2]);
  const std::vector<int64_t> slot = ints_of(args[3]), stages = ints_of(args[4]);
  const auto gran = args[5].toListRef(), name = args[6].toListRef();
  const size_t nl = a.size();
  TORCH_CHECK(nl >= 1 && bias.size() == nl && slot.size() == nl && stages.size() == nl && gran.size() == nl &&
                  name.size() == nl,
              "fairy2i.ptq_packed_linear_cpu_multi needs one a, bias, slot, stages, granularity and name entry per "
              "layer, got ", nl, ", ", bias.size(), ", ", slot.size(), ", ", stages.size(), ", ", gran.size(), ", ",
              name.size());
  std::vector<at::Tensor> codes(nl), scales(nl);
  std::vector<int64_t> group_size(nl);
  for (size_t l = 0; l < nl; ++l) {
    TORCH_CHECK(a[l].size(1) == a[0].size(1), "fairy2i.ptq_packed_linear_cpu_multi (", name[l].toStringRef(),
                "): every weight must have the in_features of the first, ", a[0].size(1), ", got ", a[l].sizes());
    check_ptq_shapes(x, a[l], name[l].toStringRef());
    ptq_resolve(a[l], slot[l], stages[l], gran[l].toStringRef(), name[l].toStringRef(), codes[l], scales[l],
                group_size[l]);
  }
  std::vector<at::Tensor> ys = packed_linear_cpu_multi(x, codes, scales, bias, a[0].size(1) / 2, group_size);
  torch::jit::drop(*stack, 7);
  push_outputs(op, stack, std::move(ys));
}

#if !defined(FAIRY2I_MULTI_MAX)
#error "build through fairy2i_compile.codegen.cpu_packed, which defines FAIRY2I_MULTI_MAX"
#endif

}  // namespace

TORCH_LIBRARY_IMPL(fairy2i, CPU, lib) {
  lib.impl("packed_linear_cpu", &packed_linear_cpu);
  lib.impl("ptq_packed_linear_cpu", &ptq_packed_linear_cpu);
  for (int k = 2; k <= FAIRY2I_MULTI_MAX; ++k) {
    const std::string overload = ".n" + std::to_string(k);
    lib.impl(("packed_linear_cpu_multi" + overload).c_str(), torch::CppFunction::makeFromBoxedFunction<&multi_boxed>());
    lib.impl(("ptq_packed_linear_cpu_multi" + overload).c_str(),
             torch::CppFunction::makeFromBoxedFunction<&ptq_multi_boxed>());
  }
}
