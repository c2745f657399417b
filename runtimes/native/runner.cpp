// sdxs_runner: run one method of an ExecuTorch program (.pte) on raw tensor files.
//
// The native half of the `arm64-emulated` and `android` runtimes (runtimes/arm64_emulated.py,
// runtimes/android.py): the Python side writes each input to a file, runs this program (under
// qemu-aarch64-static or on a phone over adb), and reads the outputs back. Linked against
// ExecuTorch's prebuilt runtime, optimized/portable and quantized kernels, and the XNNPACK delegate,
// whose registrations run from static initializers (see build_arm64.sh on --no-as-needed).
//
// Usage:
//   sdxs_runner --model PROGRAM.pte --io DIR [--method NAME] [--warmup N] [--iters N]
//   sdxs_runner --model PROGRAM.pte --describe [--method NAME]
//
//   --model     the .pte program.
//   --io        folder holding in0.bin .. in<n-1>.bin, one per input of the method, in positional
//               order; out0.bin .. out<m-1>.bin are written there, one per output.
//   --method    method to run (default "forward").
//   --warmup    untimed runs before the timed ones (default 0).
//   --iters     timed runs (default 1); the outputs written are those of the last run.
//   --describe  print the method's inputs and outputs (dtype code and shape) and exit.
//
// Tensor file format ("SDXT" version 1), every field little-endian:
//   offset  size      field
//   0       4         magic "SDXT"
//   4       4         uint32 dtype code, ExecuTorch/c10 ScalarType numbering:
//                     0 uint8, 1 int8, 2 int16, 3 int32, 4 int64, 5 float16, 6 float32,
//                     7 float64, 11 bool
//   8       4         uint32 ndim (0..16)
//   12      8*ndim    int64 dims
//   12+8*ndim         data: prod(dims) elements, C-contiguous (row-major), nothing after it.
// runtimes/native_io.py writes and reads the same format.
//
// Output on success (exit 0): one line on stdout,
//   SDXS_TIMING {"method": "forward", "load_ms": 12.3, "warmup": 0, "run_ms": [45.6], "outputs": 1, "peak_rss_kb": 51200}
// load_ms covers parsing the program and loading the method (XNNPACK builds its graphs here).
// peak_rss_kb is this process's VmHWM from /proc/self/status (-1 where there is none). A parent's
// rusage of the child would not do: Linux carries the parent's high-water mark into it at exec.
// Errors: one line "sdxs_runner: error: ..." on stderr (ExecuTorch's own log lines may precede it);
// exit 2 for bad arguments or input files, 1 when loading or running the program fails.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>

#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::TensorPtr;
using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::MethodMeta;
using executorch::runtime::Tag;
using executorch::runtime::TensorInfo;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the tensor file format is little-endian; this runner copies bytes as-is");

namespace {

constexpr char kMagic[4] = {'S', 'D', 'X', 'T'};
constexpr uint32_t kMaxDims = 16;

// Bad arguments or input files: exit 2. A program that fails to load or run: exit 1.
struct UsageError {
  std::string msg;
};
struct RunError {
  std::string msg;
};

const char* kUsage =
    "usage: sdxs_runner --model PROGRAM.pte --io DIR [--method NAME] [--warmup N] [--iters N]\n"
    "       sdxs_runner --model PROGRAM.pte --describe [--method NAME]\n"
    "Runs one method of an ExecuTorch program on DIR/in<i>.bin and writes DIR/out<i>.bin\n"
    "(tensor file format: see the header of runtimes/native/runner.cpp).\n";

// Element size of the dtypes the file format allows; 0 for any other code.
size_t dtype_size(uint32_t code) {
  switch (code) {
    case 0: case 1: case 11: return 1;  // uint8, int8, bool
    case 2: case 5: return 2;           // int16, float16
    case 3: case 6: return 4;           // int32, float32
    case 4: case 7: return 8;           // int64, float64
    default: return 0;
  }
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? "," : "") << dims[i];
  s << "]";
  return s.str();
}

std::string err_str(Error e) {
  std::ostringstream s;
  s << executorch::runtime::to_string(e) << " (error 0x" << std::hex << static_cast<int>(e) << ")";
  return s.str();
}

struct RawTensor {
  uint32_t dtype = 0;
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

RawTensor read_tensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UsageError{path + ": cannot open (missing input file?)"};
  f.seekg(0, std::ios::end);
  const int64_t file_size = f.tellg();
  f.seekg(0);
  char magic[4];
  uint32_t head[2];
  if (!f.read(magic, 4) || !f.read(reinterpret_cast<char*>(head), 8))
    throw UsageError{path + ": truncated header (" + std::to_string(file_size) + " bytes)"};
  if (std::memcmp(magic, kMagic, 4) != 0) throw UsageError{path + ": not an SDXT tensor file (bad magic)"};
  RawTensor t;
  t.dtype = head[0];
  const uint32_t ndim = head[1];
  if (dtype_size(t.dtype) == 0) throw UsageError{path + ": unsupported dtype code " + std::to_string(t.dtype)};
  if (ndim > kMaxDims) throw UsageError{path + ": ndim " + std::to_string(ndim) + " exceeds " + std::to_string(kMaxDims)};
  t.dims.resize(ndim);
  if (ndim && !f.read(reinterpret_cast<char*>(t.dims.data()), 8 * ndim))
    throw UsageError{path + ": truncated header (dims)"};
  int64_t numel = 1;
  for (int64_t d : t.dims) {
    if (d < 0 || d > INT32_MAX) throw UsageError{path + ": bad dimension in shape " + shape_str(t.dims)};
    if (d && numel > INT64_MAX / d) throw UsageError{path + ": shape " + shape_str(t.dims) + " overflows"};
    numel *= d;
  }
  const int64_t header = 12 + 8 * static_cast<int64_t>(ndim);
  const int64_t nbytes = numel * static_cast<int64_t>(dtype_size(t.dtype));
  if (file_size != header + nbytes)
    throw UsageError{path + ": " + std::to_string(file_size) + " bytes, expected " + std::to_string(header + nbytes) +
                     " for dtype " + std::to_string(t.dtype) + " shape " + shape_str(t.dims)};
  t.data.resize(static_cast<size_t>(nbytes));
  if (nbytes && !f.read(reinterpret_cast<char*>(t.data.data()), nbytes)) throw UsageError{path + ": read failed"};
  return t;
}

void write_tensor(const std::string& path, uint32_t dtype, const std::vector<int64_t>& dims, const void* data,
                  size_t nbytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw RunError{tmp + ": cannot create"};
    const uint32_t head[2] = {dtype, static_cast<uint32_t>(dims.size())};
    f.write(kMagic, 4);
    f.write(reinterpret_cast<const char*>(head), 8);
    f.write(reinterpret_cast<const char*>(dims.data()), static_cast<std::streamsize>(8 * dims.size()));
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
    if (!f.flush()) throw RunError{tmp + ": write failed (disk full?)"};
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw RunError{path + ": cannot rename " + tmp};
}

std::vector<int64_t> info_dims(const TensorInfo& info) {
  std::vector<int64_t> d;
  for (int32_t s : info.sizes()) d.push_back(s);
  return d;
}

int64_t parse_count(const std::string& flag, const char* v, int64_t min) {
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (!*v || *end || n < min || n > 1000000) throw UsageError{flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'"};
  return n;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

struct Args {
  std::string model, io, method = "forward";
  int64_t warmup = 0, iters = 1;
  bool describe = false;
};

long peak_rss_kb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (k == "--describe") {
      a.describe = true;
      continue;
    }
    if (k != "--model" && k != "--io" && k != "--method" && k != "--warmup" && k != "--iters")
      throw UsageError{"unknown argument '" + k + "' (see --help)"};
    if (i + 1 >= argc) throw UsageError{k + " needs a value"};
    const char* v = argv[++i];
    if (k == "--model") a.model = v;
    else if (k == "--io") a.io = v;
    else if (k == "--method") a.method = v;
    else if (k == "--warmup") a.warmup = parse_count(k, v, 0);
    else a.iters = parse_count(k, v, 1);
  }
  if (a.model.empty()) throw UsageError{"--model is required (see --help)"};
  if (a.io.empty() && !a.describe) throw UsageError{"--io is required (see --help)"};
  return a;
}

void describe(MethodMeta& meta, const std::string& method) {
  std::printf("method %s: %zu input(s), %zu output(s)\n", method.c_str(), meta.num_inputs(), meta.num_outputs());
  for (int pass = 0; pass < 2; ++pass) {
    const size_t n = pass ? meta.num_outputs() : meta.num_inputs();
    for (size_t i = 0; i < n; ++i) {
      auto tag = pass ? meta.output_tag(i) : meta.input_tag(i);
      if (!tag.ok() || *tag != Tag::Tensor) {
        std::printf("  %s%zu: not a tensor\n", pass ? "out" : "in", i);
        continue;
      }
      auto info = pass ? meta.output_tensor_meta(i) : meta.input_tensor_meta(i);
      std::printf("  %s%zu: dtype %d shape %s\n", pass ? "out" : "in", i, static_cast<int>(info->scalar_type()),
                  shape_str(info_dims(*info)).c_str());
    }
  }
}

int run(const Args& a) {
  {
    std::ifstream probe(a.model, std::ios::binary);
    if (!probe) throw UsageError{a.model + ": cannot open the program"};
  }
  const auto t_load = std::chrono::steady_clock::now();
  // Mmap: weights stay in the page cache instead of a second heap copy (matters on a phone).
  Module module(a.model, Module::LoadMode::Mmap);
  auto names = module.method_names();
  if (!names.ok()) throw RunError{a.model + ": not a loadable ExecuTorch program: " + err_str(names.error())};
  if (!names->count(a.method)) {
    std::string have;
    for (const auto& n : *names) have += (have.empty() ? "" : ", ") + n;
    throw UsageError{a.model + ": no method '" + a.method + "' (has: " + have + ")"};
  }
  auto meta = module.method_meta(a.method);
  if (!meta.ok()) throw RunError{"method_meta('" + a.method + "') failed: " + err_str(meta.error())};
  if (a.describe) {
    describe(*meta, a.method);
    return 0;
  }
  const Error le = module.load_method(a.method);
  if (le != Error::Ok)
    throw RunError{"loading method '" + a.method + "' failed: " + err_str(le) +
                   " (a missing operator or an unregistered backend is named in the log above)"};
  const double load_ms = ms_since(t_load);

  // Inputs: in<i>.bin must match the program's declared dtype and shape exactly.
  std::vector<RawTensor> raw;
  std::vector<TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    const std::string path = a.io + "/in" + std::to_string(i) + ".bin";
    auto tag = meta->input_tag(i);
    if (!tag.ok() || *tag != Tag::Tensor) throw UsageError{"input " + std::to_string(i) + " of '" + a.method + "' is not a tensor; only tensor inputs are supported"};
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) throw RunError{"input_tensor_meta(" + std::to_string(i) + ") failed: " + err_str(info.error())};
    raw.push_back(read_tensor(path));
    RawTensor& t = raw.back();
    const auto want = info_dims(*info);
    const auto want_dtype = static_cast<uint32_t>(info->scalar_type());
    if (t.dtype != want_dtype || t.dims != want)
      throw UsageError{path + ": dtype " + std::to_string(t.dtype) + " shape " + shape_str(t.dims) + " does not match input " +
                       std::to_string(i) + " of '" + a.method + "': dtype " + std::to_string(want_dtype) + " shape " + shape_str(want)};
    std::vector<executorch::aten::SizesType> sizes(t.dims.begin(), t.dims.end());
    tensors.push_back(make_tensor_ptr(std::move(sizes), t.data.data(), info->scalar_type()));
    inputs.emplace_back(tensors.back());
  }
  // Extra in<i>.bin files mean the caller and the program disagree on the input count.
  {
    const std::string extra = a.io + "/in" + std::to_string(meta->num_inputs()) + ".bin";
    if (std::ifstream(extra)) throw UsageError{extra + " exists but '" + a.method + "' takes " + std::to_string(meta->num_inputs()) + " input(s)"};
  }

  std::vector<double> run_ms;
  std::vector<EValue> outputs;
  for (int64_t it = 0; it < a.warmup + a.iters; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    auto res = module.execute(a.method, inputs);
    const double ms = ms_since(t0);
    if (!res.ok()) throw RunError{"executing '" + a.method + "' failed: " + err_str(res.error())};
    if (it >= a.warmup) run_ms.push_back(ms);
    outputs = std::move(*res);
  }

  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) throw RunError{"output " + std::to_string(i) + " of '" + a.method + "' is not a tensor"};
    const Tensor& t = outputs[i].toTensor();
    if (!executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim()))
      throw RunError{"output " + std::to_string(i) + " is not in contiguous (NCHW) dim order; re-export without a channels-last output"};
    const uint32_t dtype = static_cast<uint32_t>(t.scalar_type());
    if (dtype_size(dtype) == 0) throw RunError{"output " + std::to_string(i) + " has dtype code " + std::to_string(dtype) + ", which the file format does not carry"};
    std::vector<int64_t> dims(t.sizes().begin(), t.sizes().end());
    write_tensor(a.io + "/out" + std::to_string(i) + ".bin", dtype, dims, t.const_data_ptr(), t.nbytes());
  }

  std::printf("SDXS_TIMING {\"method\": \"%s\", \"load_ms\": %.3f, \"warmup\": %" PRId64 ", \"run_ms\": [", a.method.c_str(), load_ms, a.warmup);
  for (size_t i = 0; i < run_ms.size(); ++i) std::printf("%s%.3f", i ? ", " : "", run_ms[i]);
  std::printf("], \"outputs\": %zu, \"peak_rss_kb\": %ld}\n", outputs.size(), peak_rss_kb());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "sdxs_runner: error: %s\n", e.msg.c_str());
    return 2;
  } catch (const RunError& e) {
    std::fprintf(stderr, "sdxs_runner: error: %s\n", e.msg.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sdxs_runner: error: %s\n", e.what());
    return 1;
  }
}
