// One-pass per-feature sums for XLA:CPU, called through the XLA FFI.
//
// XLA:CPU reduces with library kernels that read their input once per sum, so
// batch norm's two sums read the activation tensor twice (and the backward's
// read dy twice). These kernels take both sums in one read, on XLA's intra-op
// thread pool:
//
//   jaxbn_sums_square(x, K)      -> [sum(x - K), sum((x - K)^2)]
//   jaxbn_sums_product(w, x, K)  -> [sum(w),     sum(w * (x - K))]
//
// x and w are float32 or bfloat16 arrays of shape (P..., A, C, B), or
// (P..., A, C) with the attribute rows=true: the sums run over A and B for each
// of the C features, separately for each leading index P (the batch
// dimensions vmap adds). K has shape (P..., C) and the result
// (P..., 2, C), both float32. Each feature's values are summed in float32
// over blocks of at most 64 rows (or 2048 values of a run) and the block sums
// in float64, in an order fixed by the shape alone: results do not depend on
// the number of threads, and are as accurate as XLA's own float32 sums.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 where the processor has it, SSE2 otherwise; chosen once at load time.
#define JAXBN_VECTOR_CLONES __attribute__((target_clones("avx2", "default"), flatten))
#else
#define JAXBN_VECTOR_CLONES
#endif

typedef float Floats __attribute__((vector_size(32)));
typedef uint32_t Words __attribute__((vector_size(32)));
typedef uint16_t Halves __attribute__((vector_size(16)));
constexpr int kLanes = 8;
constexpr int kGroup = 2 * kLanes;  // values taken per step: two vectors

using bfloat16_bits = uint16_t;

inline float AsFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T>
inline Floats AsFloats(T bits) {
  Floats v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline float Load(const float* p) { return *p; }
inline float Load(const bfloat16_bits* p) { return AsFloat(uint32_t(*p) << 16); }

// 16 consecutive values as two vectors. kSplit (bfloat16 only): the values at
// even positions, then those at odd positions, which takes two instructions
// (bfloat16 is float32's upper half); otherwise in order.
template <bool kSplit>
inline void LoadGroup(const float* p, Floats& low, Floats& high) {
  std::memcpy(&low, p, sizeof low);
  std::memcpy(&high, p + kLanes, sizeof high);
}
template <bool kSplit>
inline void LoadGroup(const bfloat16_bits* p, Floats& low, Floats& high) {
  if constexpr (kSplit) {
    Words words;
    std::memcpy(&words, p, sizeof words);
    low = AsFloats(words << 16);
    high = AsFloats(words & 0xFFFF0000u);
  } else {
    Halves h[2];
    std::memcpy(h, p, sizeof h);
    low = AsFloats(__builtin_convertvector(h[0], Words) << 16);
    high = AsFloats(__builtin_convertvector(h[1], Words) << 16);
  }
}
// The feature whose sums SumRows keeps at buffer slot c: LoadGroup<kSplit>
// reorders each whole group of 16 features; the `grouped` first ones are in groups.
template <bool kSplit>
inline int64_t FeatureAt(int64_t c, int64_t grouped) {
  if (!kSplit || c >= grouped) return c;
  const int64_t slot = c % kGroup;
  return c - slot + (slot < kLanes ? 2 * slot : 2 * (slot - kLanes) + 1);
}

// Adds the two summands of one vector (or one value) to their accumulators:
// (x - K, (x - K)^2) for kSquare, else (w, w (x - K)).
template <bool kSquare, typename V>
inline void Accumulate(V w, V x, V k, V& first, V& second) {
  if constexpr (kSquare) {
    const V d = x - k;
    first += d;
    second += d * d;
  } else {
    first += w;
    second += w * (x - k);
  }
}

// Adds the 16 values of x (and w) at element i to two pairs of accumulators.
template <bool kSquare, bool kSplit, typename TW, typename TX>
inline void AccumulateGroup(const TW* w, const TX* x, int64_t i, Floats k_low, Floats k_high, Floats& first_low,
                            Floats& first_high, Floats& second_low, Floats& second_high) {
  Floats x_low, x_high, w_low = {}, w_high = {};
  LoadGroup<kSplit>(x + i, x_low, x_high);
  if constexpr (!kSquare) LoadGroup<kSplit>(w + i, w_low, w_high);
  Accumulate<kSquare>(w_low, x_low, k_low, first_low, second_low);
  Accumulate<kSquare>(w_high, x_high, k_high, first_high, second_high);
}
template <bool kSquare, typename TW, typename TX>
inline void AccumulateOne(const TW* w, const TX* x, int64_t i, float k, float& first, float& second) {
  float weight = 0.f;
  if constexpr (!kSquare) weight = Load(w + i);
  Accumulate<kSquare>(weight, Load(x + i), k, first, second);
}

inline Floats LoadFloats(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void StoreFloats(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }

// Split bfloat16 loads need both operands split the same way.
template <bool kSquare, typename TW, typename TX>
constexpr bool kSplitLoads = std::is_same_v<TX, bfloat16_bits> && (kSquare || std::is_same_v<TW, TX>);

struct Layout {
  int64_t P, A, C, B;
};

constexpr int64_t kRowBlock = 64;       // rows summed in float32 before a float64 flush
constexpr int64_t kRunFlush = 2048;     // values per feature likewise (B > 1)

// B == 1: rows [row, end) of C values, all of one leading index; the sums go
// to out[0:C] and out[C:2C]. The rows stream past once; a block's float32
// sums live in `buffer` (3C floats, in L1 for typical C), with the shift, in
// LoadGroup's order.
template <bool kSquare, typename TW, typename TX>
JAXBN_VECTOR_CLONES void SumRows(const TW* w, const TX* x, const float* k, int64_t row, int64_t end, int64_t C,
                                 float* buffer, double* out) {
  constexpr bool kSplit = kSplitLoads<kSquare, TW, TX>;
  const int64_t grouped = C - C % kGroup;
  float *first = buffer, *second = buffer + C, *shift = buffer + 2 * C;
  for (int64_t c = 0; c < C; ++c) shift[c] = k[FeatureAt<kSplit>(c, grouped)];
  for (int64_t block = row; block < end; block += kRowBlock) {
    std::fill(first, first + 2 * C, 0.f);
    for (int64_t r = block, stop = std::min(end, block + kRowBlock); r < stop; ++r) {
      const int64_t base = r * C;
      for (int64_t c = 0; c < grouped; c += kGroup) {
        Floats f0 = LoadFloats(first + c), f1 = LoadFloats(first + c + kLanes);
        Floats s0 = LoadFloats(second + c), s1 = LoadFloats(second + c + kLanes);
        AccumulateGroup<kSquare, kSplit>(w, x, base + c, LoadFloats(shift + c), LoadFloats(shift + c + kLanes), f0, f1,
                                         s0, s1);
        StoreFloats(first + c, f0);
        StoreFloats(first + c + kLanes, f1);
        StoreFloats(second + c, s0);
        StoreFloats(second + c + kLanes, s1);
      }
      for (int64_t c = grouped; c < C; ++c) AccumulateOne<kSquare>(w, x, base + c, k[c], first[c], second[c]);
    }
    for (int64_t c = 0; c < C; ++c) {
      out[FeatureAt<kSplit>(c, grouped)] += first[c];
      out[C + FeatureAt<kSplit>(c, grouped)] += second[c];
    }
  }
}

// B > 1: `count` runs of B contiguous values of one feature, `stride` apart
// (the feature's values at consecutive positions along A); the sums go to
// *first_out and *second_out. The order of the values does not matter here.
template <bool kSquare, typename TW, typename TX>
JAXBN_VECTOR_CLONES void SumRuns(const TW* w, const TX* x, float k, int64_t count, int64_t B, int64_t stride,
                                 double* first_out, double* second_out) {
  constexpr bool kSplit = kSplitLoads<kSquare, TW, TX>;
  const Floats shift = Floats{} + k;
  // Four independent accumulators per sum hide the adds' latency.
  Floats first[4] = {}, second[4] = {};
  float first_tail = 0, second_tail = 0;
  double first_sum = 0, second_sum = 0;
  int64_t pending = 0;  // values in the float32 accumulators
  auto flush = [&]() {
    const Floats first_total = (first[0] + first[1]) + (first[2] + first[3]);
    const Floats second_total = (second[0] + second[1]) + (second[2] + second[3]);
    for (int l = 0; l < kLanes; ++l) {
      first_sum += first_total[l];
      second_sum += second_total[l];
    }
    first_sum += first_tail;
    second_sum += second_tail;
    for (int q = 0; q < 4; ++q) first[q] = second[q] = Floats{};
    first_tail = second_tail = 0;
    pending = 0;
  };
  for (int64_t run = 0; run < count; ++run) {
    const int64_t base = run * stride;
    for (int64_t start = 0; start < B; start += kRunFlush) {
      const int64_t stop = std::min(B, start + kRunFlush);
      int64_t j = start;
      for (; j + 2 * kGroup <= stop; j += 2 * kGroup) {
        AccumulateGroup<kSquare, kSplit>(w, x, base + j, shift, shift, first[0], first[1], second[0], second[1]);
        AccumulateGroup<kSquare, kSplit>(w, x, base + j + kGroup, shift, shift, first[2], first[3], second[2],
                                         second[3]);
      }
      for (; j < stop; ++j) AccumulateOne<kSquare>(w, x, base + j, k, first_tail, second_tail);
      pending += stop - start;
      if (pending >= kRunFlush) flush();
    }
  }
  flush();
  *first_out += first_sum;
  *second_out += second_sum;
}

// Splits the work into chunks fixed by the layout, runs them on the calling
// thread and the pool's, and adds the chunks' float64 partial sums in order.
template <bool kSquare, typename TW, typename TX>
void Sums(const TW* w, const TX* x, const float* k, Layout s, float* result, ffi::ThreadPool& pool) {
  const bool rows = s.B == 1;
  // A unit of work: a row of C values (rows), or `runs` runs of one feature's
  // B values, so that a unit holds at least 2^15 values where it can.
  const int64_t runs = rows ? 1 : std::clamp<int64_t>((int64_t{1} << 15) / s.B, 1, s.A);
  const int64_t runs_per_feature = (s.A + runs - 1) / runs;
  const int64_t units = rows ? s.P * s.A : s.P * s.C * runs_per_feature;
  const int64_t out_size = s.P * 2 * s.C;
  // A unit that is a whole feature writes its sums straight to the result;
  // otherwise each chunk adds into float64 partial sums of every feature.
  const bool whole_features = !rows && runs_per_feature == 1;
  int64_t chunks = std::clamp<int64_t>(s.P * s.A * s.C * s.B / (int64_t{1} << 16), 1, 64);
  chunks = std::min(chunks, units);
  if (!whole_features) chunks = std::min(chunks, std::max<int64_t>(1, (int64_t{1} << 22) / out_size));

  struct Shared {
    std::vector<double> partial;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  if (!whole_features) shared->partial.assign(chunks * out_size, 0.0);
  auto work = [=]() {
    std::vector<float> buffer(rows ? 3 * s.C : 0);
    for (int64_t chunk; (chunk = shared->next.fetch_add(1)) < chunks;) {
      double* out = whole_features ? nullptr : shared->partial.data() + chunk * out_size;
      for (int64_t unit = units * chunk / chunks, end = units * (chunk + 1) / chunks; unit < end;) {
        if (rows) {  // the rows of one leading index at a time
          const int64_t p = unit / s.A, stop = std::min(end, (p + 1) * s.A);
          SumRows<kSquare>(w, x, k + p * s.C, unit, stop, s.C, buffer.data(), out + p * 2 * s.C);
          unit = stop;
        } else {  // unit = ((p, c), piece of A)
          const int64_t feature = unit / runs_per_feature, a = (unit % runs_per_feature) * runs;
          const int64_t p = feature / s.C, c = feature % s.C;
          const int64_t offset = ((p * s.A + a) * s.C + c) * s.B;
          double first = 0, second = 0;
          SumRuns<kSquare>(w + offset, x + offset, k[feature], std::min(runs, s.A - a), s.B, s.C * s.B, &first,
                           &second);
          const int64_t at = p * 2 * s.C + c;
          if (whole_features) {
            result[at] = static_cast<float>(first);
            result[at + s.C] = static_cast<float>(second);
          } else {
            out[at] += first;
            out[at + s.C] += second;
          }
          ++unit;
        }
      }
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  // The calling thread works too, so the sums finish even if the pool is busy.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(std::function<void()>(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  if (whole_features) return;
  for (int64_t o = 0; o < out_size; ++o) {
    double total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += shared->partial[chunk * out_size + o];
    result[o] = static_cast<float>(total);
  }
}

ffi::Error CheckOperand(ffi::AnyBuffer buffer, const char* name, bool rows) {
  const auto type = buffer.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument(std::string(name) + " must be float32 or bfloat16");
  if (buffer.dimensions().size() < (rows ? 2 : 3))
    return ffi::Error::InvalidArgument(std::string(name) + " must have shape (..., A, C) with rows, else (..., A, C, B)");
  return ffi::Error::Success();
}

// x's shape is (P..., A, C, B), or (P..., A, C) for B == 1 (`rows`): a trailing
// dimension of size 1 would cost XLA:CPU a copy of a bfloat16 operand.
Layout LayoutOf(ffi::AnyBuffer x, bool rows) {
  const auto dims = x.dimensions();
  const int64_t rank = dims.size(), kept = rows ? 2 : 3;
  Layout s{1, dims[rank - kept], dims[rank - kept + 1], rows ? 1 : dims[rank - 1]};
  for (int64_t i = 0; i < rank - kept; ++i) s.P *= dims[i];
  return s;
}

template <bool kSquare, typename TW>
void SumsOfX(const TW* w, ffi::AnyBuffer x, bool rows, const float* k, float* result, ffi::ThreadPool& pool) {
  const Layout s = LayoutOf(x, rows);
  if (x.element_type() == ffi::DataType::F32)
    Sums<kSquare>(w, static_cast<const float*>(x.untyped_data()), k, s, result, pool);
  else
    Sums<kSquare>(w, static_cast<const bfloat16_bits*>(x.untyped_data()), k, s, result, pool);
}

ffi::Error SumsSquare(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::DataType::F32> shift,
                      ffi::ResultBuffer<ffi::DataType::F32> result, bool rows) {
  if (ffi::Error error = CheckOperand(x, "x", rows); error.failure()) return error;
  SumsOfX<true>(static_cast<const float*>(nullptr), x, rows, shift.typed_data(), result->typed_data(), pool);
  return ffi::Error::Success();
}

ffi::Error SumsProduct(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::AnyBuffer x, ffi::Buffer<ffi::DataType::F32> shift,
                       ffi::ResultBuffer<ffi::DataType::F32> result, bool rows) {
  for (auto [buffer, name] : {std::pair{w, "w"}, std::pair{x, "x"}})
    if (ffi::Error error = CheckOperand(buffer, name, rows); error.failure()) return error;
  if (w.element_count() != x.element_count()) return ffi::Error::InvalidArgument("w and x must have one shape");
  if (w.element_type() == ffi::DataType::F32)
    SumsOfX<false>(static_cast<const float*>(w.untyped_data()), x, rows, shift.typed_data(), result->typed_data(),
                   pool);
  else
    SumsOfX<false>(static_cast<const bfloat16_bits*>(w.untyped_data()), x, rows, shift.typed_data(),
                   result->typed_data(), pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSumsSquare, SumsSquare,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::DataType::F32>>()
                                  .Ret<ffi::Buffer<ffi::DataType::F32>>()
                                  .Attr<bool>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSumsProduct, SumsProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::DataType::F32>>()
                                  .Ret<ffi::Buffer<ffi::DataType::F32>>()
                                  .Attr<bool>("rows"));

// The Python module: targets() -> {name: capsule} for jax.ffi.register_ffi_target.
static PyObject* Targets(PyObject*, PyObject*) {
  PyObject* targets = PyDict_New();
  if (targets == nullptr) return nullptr;
  const std::pair<const char*, void*> handlers[] = {
      {"jaxbn_sums_square", reinterpret_cast<void*>(JaxbnSumsSquare)},
      {"jaxbn_sums_product", reinterpret_cast<void*>(JaxbnSumsProduct)},
  };
  for (auto [name, handler] : handlers) {
    PyObject* capsule = PyCapsule_New(handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(targets, name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(targets);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return targets;
}

static PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "The XLA FFI handlers: {target name: PyCapsule}."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                              "jaxbn's one-pass per-feature sums for XLA:CPU (XLA FFI handlers).", -1, kMethods};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
