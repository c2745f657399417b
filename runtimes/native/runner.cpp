// sdxs_runner: run ExecuTorch programs (.pte) on raw tensor files.
//
// The native half of the `arm64-emulated`, `android` and `executorch-native` runtimes
// (runtimes/arm64_emulated.py, runtimes/android.py, runtimes/native_session.py): the Python side
// writes each input to a file, runs this program (under qemu-aarch64-static, on a phone over adb, or
// as one long-lived process on this machine with --serve), and reads the outputs back. Linked against
// ExecuTorch's prebuilt runtime, optimized/portable and quantized kernels, and the XNNPACK delegate,
// whose registrations run from static initializers (see build_arm64.sh on --no-as-needed).
//
// Usage:
//   sdxs_runner --model PROGRAM.pte --io DIR [--method NAME] [--warmup N] [--iters N] [RUNTIME OPTIONS]
//   sdxs_runner --model PROGRAM.pte --describe [--method NAME]
//   sdxs_runner --serve --program NAME=PROGRAM.pte [--program NAME=PROGRAM.pte ...] [--method NAME] [RUNTIME OPTIONS]
//
//   --model     the .pte program.
//   --io        folder holding in0.bin .. in<n-1>.bin, one per input of the method, in positional
//               order; out0.bin .. out<m-1>.bin are written there, one per output.
//   --method    method to run (default "forward").
//   --warmup    untimed runs before the timed ones (default 0).
//   --iters     timed runs (default 1); the outputs written are those of the last run.
//   --describe  print the method's inputs and outputs (dtype code and shape) and exit.
//   --serve     load every --program (and its method) once, largest file first, print one line
//                 SDXS_READY {"load_ms": {"NAME": 12.3, ...}, "load_order": ["NAME", ...], "threads": 2,
//                             "workspace_sharing": "global", "peak_rss_kb": 51200}
//               then answer requests read from stdin, one per line, until "quit" or end of input:
//                 run NAME DIR   runs program NAME on DIR/in<i>.bin, writes DIR/out<i>.bin (in place) and prints
//                                SDXS_TIMING {"program": "NAME", "method": ..., "run_ms": [..], "outputs": 1, "peak_rss_kb": ...}
//                 run-method NAME METHOD DIR   the same with another method of the program (a bundle of
//                                several image sizes has one per size: forward_<W>x<H>), loaded on first use
//               A request that fails prints SDXS_ERROR {"message": "..."} and the runner goes on serving.
//               One process then holds every program, as an app does: the libraries are counted once and
//               the XNNPACK workspace (activation arena) can be shared between programs.
// Runtime options:
//   --threads N            size ExecuTorch's threadpool (XNNPACK runs on it) to N; default one per core.
//   --workspace-sharing M  XNNPACK activation arenas: "disabled" (one per delegate call), "per-model"
//                          (one per program) or "global" (one for every program; they run one at a
//                          time). Default: the backend's own ("disabled" in ExecuTorch 1.5), "global"
//                          with --serve.
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
//   SDXS_TIMING {"method": "forward", "load_ms": 12.3, "warmup": 0, "run_ms": [45.6], "outputs": 1, "threads": 2, "peak_rss_kb": 51200}
// load_ms covers parsing the program and loading the method (XNNPACK builds its graphs here).
// peak_rss_kb is this process's VmHWM from /proc/self/status (-1 where there is none). A parent's
// rusage of the child would not do: Linux carries the parent's high-water mark into it at exec.
// Errors: one line "sdxs_runner: error: ..." on stderr (ExecuTorch's own log lines may precede it);
// exit 2 for bad arguments or input files, 1 when loading or running the program fails.

#include <executorch/extension/module/module.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "sdxt.h"

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

// libexecutorch_threadpool's ThreadPool (extension/threadpool/threadpool.h, which the wheel does not
// ship): only these two members are called, through the pointer get_threadpool() returns.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the tensor file format is little-endian; this runner copies bytes as-is");

namespace {

using sdxs::RawTensor;
using sdxs::RunError;
using sdxs::UsageError;
using sdxs::dtype_size;
using sdxs::json_str;
using sdxs::kMagic;
using sdxs::read_tensor;
using sdxs::shape_str;

const char* kUsage =
    "usage: sdxs_runner --model PROGRAM.pte --io DIR [--method NAME] [--warmup N] [--iters N] [OPTIONS]\n"
    "       sdxs_runner --model PROGRAM.pte --describe [--method NAME]\n"
    "       sdxs_runner --serve --program NAME=PROGRAM.pte [--program ...] [--method NAME] [OPTIONS]\n"
    "options: --threads N, --workspace-sharing disabled|per-model|global\n"
    "Runs one method of an ExecuTorch program on DIR/in<i>.bin and writes DIR/out<i>.bin; --serve keeps\n"
    "the programs loaded and answers 'run NAME DIR' lines on stdin (protocol and tensor file format:\n"
    "see the header of runtimes/native/runner.cpp).\n";

std::string err_str(Error e) {
  std::ostringstream s;
  s << executorch::runtime::to_string(e) << " (error 0x" << std::hex << static_cast<int>(e) << ")";
  return s.str();
}

// Writes one SDXT file. One-shot runs write a temporary file and rename it into place. --serve overwrites
// the file in place (in_place): the caller reads it only after this request's SDXS_TIMING line, and
// rewriting the same pages is much cheaper than allocating new ones (a 3 MB decoder output on tmpfs:
// 0.2 ms in place against 1.5 ms for a new file).
void write_tensor(const std::string& path, uint32_t dtype, const std::vector<int64_t>& dims, const void* data,
                  size_t nbytes, bool in_place) {
  const uint32_t head[2] = {dtype, static_cast<uint32_t>(dims.size())};
  std::string header(kMagic, 4);
  header.append(reinterpret_cast<const char*>(head), 8);
  header.append(reinterpret_cast<const char*>(dims.data()), 8 * dims.size());
  const std::string target = in_place ? path : path + ".tmp";
  const int fd = ::open(target.c_str(), O_WRONLY | O_CREAT | (in_place ? 0 : O_TRUNC), 0644);
  if (fd < 0) throw RunError{target + ": cannot create: " + std::strerror(errno)};
  auto put = [&](const void* p, size_t n, off_t at) {
    const char* c = static_cast<const char*>(p);
    while (n) {
      const ssize_t w = ::pwrite(fd, c, n, at);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        const std::string why = w < 0 ? std::strerror(errno) : "no progress";
        ::close(fd);
        throw RunError{target + ": write failed (disk full?): " + why};
      }
      c += w, n -= static_cast<size_t>(w), at += w;
    }
  };
  put(header.data(), header.size(), 0);
  put(data, nbytes, static_cast<off_t>(header.size()));
  const off_t total = static_cast<off_t>(header.size() + nbytes);
  const bool sized = ::ftruncate(fd, total) == 0;  // drops a longer file's stale tail
  const int err = errno;
  if (::close(fd) != 0 || !sized) throw RunError{target + ": write failed: " + std::strerror(sized ? errno : err)};
  if (!in_place && std::rename(target.c_str(), path.c_str()) != 0) throw RunError{path + ": cannot rename " + target};
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
  int64_t warmup = 0, iters = 1, threads = 0;  // threads 0: ExecuTorch's default (one per core)
  bool describe = false, serve = false;
  std::string workspace;                                     // "" : the backend's default
  std::vector<std::pair<std::string, std::string>> programs;  // --serve: name, path
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
    if (k == "--describe" || k == "--serve") {
      (k == "--serve" ? a.serve : a.describe) = true;
      continue;
    }
    if (k != "--model" && k != "--io" && k != "--method" && k != "--warmup" && k != "--iters" && k != "--threads" &&
        k != "--workspace-sharing" && k != "--program")
      throw UsageError{"unknown argument '" + k + "' (see --help)"};
    if (i + 1 >= argc) throw UsageError{k + " needs a value"};
    const char* v = argv[++i];
    if (k == "--model") a.model = v;
    else if (k == "--io") a.io = v;
    else if (k == "--method") a.method = v;
    else if (k == "--warmup") a.warmup = parse_count(k, v, 0);
    else if (k == "--iters") a.iters = parse_count(k, v, 1);
    else if (k == "--threads") a.threads = parse_count(k, v, 1);
    else if (k == "--workspace-sharing") {
      a.workspace = v;
      if (a.workspace != "disabled" && a.workspace != "per-model" && a.workspace != "global")
        throw UsageError{"--workspace-sharing expects disabled, per-model or global, got '" + a.workspace + "'"};
    } else {
      const std::string p = v;
      const size_t eq = p.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == p.size())
        throw UsageError{"--program expects NAME=PROGRAM.pte, got '" + p + "'"};
      const std::string name = p.substr(0, eq);
      for (const auto& have : a.programs)
        if (have.first == name) throw UsageError{"--program " + name + " given twice"};
      if (name.find_first_of(" \t") != std::string::npos) throw UsageError{"--program name '" + name + "' has whitespace"};
      a.programs.emplace_back(name, p.substr(eq + 1));
    }
  }
  if (a.serve) {
    if (a.programs.empty()) throw UsageError{"--serve needs at least one --program NAME=PROGRAM.pte (see --help)"};
    if (!a.model.empty() || !a.io.empty() || a.describe) throw UsageError{"--serve takes --program, not --model, --io or --describe"};
    if (a.workspace.empty()) a.workspace = "global";  // the programs run one at a time
    return a;
  }
  if (!a.programs.empty()) throw UsageError{"--program is for --serve; run one program with --model"};
  if (a.model.empty()) throw UsageError{"--model is required (see --help)"};
  if (a.io.empty() && !a.describe) throw UsageError{"--io is required (see --help)"};
  return a;
}

// Threadpool size and XNNPACK workspace sharing: both must be set before any program loads.
int64_t setup_runtime(const Args& a) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) throw RunError{"ExecuTorch has no threadpool in this build"};
  if (a.threads > 0 && !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(a.threads)))
    throw RunError{"cannot resize the threadpool to " + std::to_string(a.threads) + " threads"};
  if (!a.workspace.empty()) {
    const int mode = a.workspace == "disabled" ? 0 : a.workspace == "per-model" ? 1 : 2;  // WorkspaceSharingMode
    executorch::runtime::BackendOptions<1> opts;
    opts.set_option("workspace_sharing_mode", mode);
    const Error e = executorch::runtime::set_option("XnnpackBackend", opts.view());
    if (e != Error::Ok) throw RunError{"setting the XNNPACK workspace sharing mode failed: " + err_str(e)};
  }
  return static_cast<int64_t>(pool->get_thread_count());
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

// Opens `path` (mmapped: weights stay in the page cache instead of a second heap copy, which matters on
// a phone) and checks it has `method`; loads the method unless only describing.
std::unique_ptr<Module> open_program(const std::string& path, const std::string& method, bool load) {
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) throw UsageError{path + ": cannot open the program"};
  }
  auto module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  auto names = module->method_names();
  if (!names.ok()) throw RunError{path + ": not a loadable ExecuTorch program: " + err_str(names.error())};
  if (!names->count(method)) {
    std::string have;
    for (const auto& n : *names) have += (have.empty() ? "" : ", ") + n;
    throw UsageError{path + ": no method '" + method + "' (has: " + have + ")"};
  }
  if (load) {
    const Error le = module->load_method(method);
    if (le != Error::Ok)
      throw RunError{path + ": loading method '" + method + "' failed: " + err_str(le) +
                     " (a missing operator or an unregistered backend is named in the log above)"};
  }
  return module;
}

// The method's inputs from io/in<i>.bin, each checked against the program's declared dtype and shape.
struct Inputs {
  std::vector<RawTensor> raw;
  std::vector<TensorPtr> tensors;
  std::vector<EValue> values;
};

Inputs read_inputs(const MethodMeta& meta, const std::string& io, const std::string& method) {
  Inputs in;
  in.raw.reserve(meta.num_inputs());  // the tensors point into raw's buffers: no reallocation
  for (size_t i = 0; i < meta.num_inputs(); ++i) {
    const std::string path = io + "/in" + std::to_string(i) + ".bin";
    auto tag = meta.input_tag(i);
    if (!tag.ok() || *tag != Tag::Tensor) throw UsageError{"input " + std::to_string(i) + " of '" + method + "' is not a tensor; only tensor inputs are supported"};
    auto info = meta.input_tensor_meta(i);
    if (!info.ok()) throw RunError{"input_tensor_meta(" + std::to_string(i) + ") failed: " + err_str(info.error())};
    in.raw.push_back(read_tensor(path));
    RawTensor& t = in.raw.back();
    const auto want = info_dims(*info);
    const auto want_dtype = static_cast<uint32_t>(info->scalar_type());
    if (t.dtype != want_dtype || t.dims != want)
      throw UsageError{path + ": dtype " + std::to_string(t.dtype) + " shape " + shape_str(t.dims) + " does not match input " +
                       std::to_string(i) + " of '" + method + "': dtype " + std::to_string(want_dtype) + " shape " + shape_str(want)};
    std::vector<executorch::aten::SizesType> sizes(t.dims.begin(), t.dims.end());
    in.tensors.push_back(make_tensor_ptr(std::move(sizes), t.data.data(), info->scalar_type()));
    in.values.emplace_back(in.tensors.back());
  }
  // Extra in<i>.bin files mean the caller and the program disagree on the input count.
  const std::string extra = io + "/in" + std::to_string(meta.num_inputs()) + ".bin";
  if (std::ifstream(extra)) throw UsageError{extra + " exists but '" + method + "' takes " + std::to_string(meta.num_inputs()) + " input(s)"};
  return in;
}

void write_outputs(const std::vector<EValue>& outputs, const std::string& io, const std::string& method, bool in_place) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) throw RunError{"output " + std::to_string(i) + " of '" + method + "' is not a tensor"};
    const Tensor& t = outputs[i].toTensor();
    if (!executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim()))
      throw RunError{"output " + std::to_string(i) + " is not in contiguous (NCHW) dim order; re-export without a channels-last output"};
    const uint32_t dtype = static_cast<uint32_t>(t.scalar_type());
    if (dtype_size(dtype) == 0) throw RunError{"output " + std::to_string(i) + " has dtype code " + std::to_string(dtype) + ", which the file format does not carry"};
    std::vector<int64_t> dims(t.sizes().begin(), t.sizes().end());
    write_tensor(io + "/out" + std::to_string(i) + ".bin", dtype, dims, t.const_data_ptr(), t.nbytes(), in_place);
  }
}

std::vector<EValue> execute(Module& module, const std::string& method, const std::vector<EValue>& inputs, double* ms) {
  const auto t0 = std::chrono::steady_clock::now();
  auto res = module.execute(method, inputs);
  *ms = ms_since(t0);
  if (!res.ok()) throw RunError{"executing '" + method + "' failed: " + err_str(res.error())};
  return std::move(*res);
}

int run(const Args& a) {
  if (a.describe) {
    auto module = open_program(a.model, a.method, false);
    auto meta = module->method_meta(a.method);
    if (!meta.ok()) throw RunError{"method_meta('" + a.method + "') failed: " + err_str(meta.error())};
    describe(*meta, a.method);
    return 0;
  }
  const int64_t threads = setup_runtime(a);
  const auto t_load = std::chrono::steady_clock::now();
  auto module = open_program(a.model, a.method, true);
  const double load_ms = ms_since(t_load);
  auto meta = module->method_meta(a.method);
  if (!meta.ok()) throw RunError{"method_meta('" + a.method + "') failed: " + err_str(meta.error())};
  Inputs in = read_inputs(*meta, a.io, a.method);

  std::vector<double> run_ms;
  std::vector<EValue> outputs;
  for (int64_t it = 0; it < a.warmup + a.iters; ++it) {
    double ms = 0;
    outputs = execute(*module, a.method, in.values, &ms);
    if (it >= a.warmup) run_ms.push_back(ms);
  }
  write_outputs(outputs, a.io, a.method, false);

  std::printf("SDXS_TIMING {\"method\": %s, \"load_ms\": %.3f, \"warmup\": %" PRId64 ", \"run_ms\": [", json_str(a.method).c_str(), load_ms, a.warmup);
  for (size_t i = 0; i < run_ms.size(); ++i) std::printf("%s%.3f", i ? ", " : "", run_ms[i]);
  std::printf("], \"outputs\": %zu, \"threads\": %" PRId64 ", \"peak_rss_kb\": %ld}\n", outputs.size(), threads, peak_rss_kb());
  return 0;
}

// The order to load programs in: largest file first. Loading a program briefly holds its weights twice
// (the mapped file pages XNNPACK packs from, and the packed copy) until its delegate data is released;
// loaded first, that doubling happens before the other programs' packed weights exist. On the sdxs-512
// int8 bundle the runner's peak drops from 679 MB (text encoder, U-Net, decoder) to 592 MB.
std::vector<size_t> largest_first(const std::vector<std::pair<std::string, std::string>>& programs) {
  std::vector<std::pair<std::uintmax_t, size_t>> by_size;
  for (size_t k = 0; k < programs.size(); ++k) {
    std::error_code ec;  // an unreadable file fails in open_program() with its own message
    const std::uintmax_t size = std::filesystem::file_size(programs[k].second, ec);
    by_size.emplace_back(ec ? 0 : size, k);
  }
  std::stable_sort(by_size.begin(), by_size.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<size_t> order;
  for (const auto& [size, k] : by_size) order.push_back(k);
  return order;
}

// --serve: every program loaded once (largest first), then one request per stdin line (see the header).
int serve(const Args& a) {
  const int64_t threads = setup_runtime(a);
  std::vector<std::unique_ptr<Module>> modules(a.programs.size());
  std::vector<double> load_ms(a.programs.size());
  const std::vector<size_t> order = largest_first(a.programs);
  for (const size_t k : order) {
    const auto t0 = std::chrono::steady_clock::now();
    modules[k] = open_program(a.programs[k].second, a.method, true);
    load_ms[k] = ms_since(t0);
  }
  std::string load_json, order_json;
  for (const size_t k : order) order_json += (order_json.empty() ? "" : ", ") + json_str(a.programs[k].first);
  for (size_t k = 0; k < a.programs.size(); ++k) {
    char buf[64];
    std::snprintf(buf, sizeof buf, ": %.3f", load_ms[k]);
    load_json += (load_json.empty() ? "" : ", ") + json_str(a.programs[k].first) + buf;
  }
  std::printf("SDXS_READY {\"load_ms\": {%s}, \"load_order\": [%s], \"method\": %s, \"threads\": %" PRId64 ", \"workspace_sharing\": %s, \"peak_rss_kb\": %ld}\n",
              load_json.c_str(), order_json.c_str(), json_str(a.method).c_str(), threads, json_str(a.workspace).c_str(), peak_rss_kb());
  std::fflush(stdout);

  std::string line;
  while (std::getline(std::cin, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line == "quit") break;
    std::string error;  // one SDXS_ERROR line per failed request; the runner keeps serving
    try {
      const sdxs::Request req = sdxs::parse_request(line, a.programs);
      const size_t k = req.program;
      const std::string& name = a.programs[k].first;
      const std::string method = req.method.empty() ? a.method : req.method;
      Module& module = *modules[k];
      if (!module.is_method_loaded(method)) {  // another size's method: loaded on first use, then kept
        auto names = module.method_names();
        if (!names.ok() || !names->count(method)) throw UsageError{a.programs[k].second + ": no method '" + method + "'"};
        const Error le = module.load_method(method);
        if (le != Error::Ok) throw RunError{"loading method '" + method + "' failed: " + err_str(le)};
      }
      auto meta = module.method_meta(method);
      if (!meta.ok()) throw RunError{"method_meta('" + method + "') failed: " + err_str(meta.error())};
      Inputs in = read_inputs(*meta, req.io, method);
      double ms = 0;
      const std::vector<EValue> outputs = execute(module, method, in.values, &ms);
      write_outputs(outputs, req.io, method, true);
      std::printf("SDXS_TIMING {\"program\": %s, \"method\": %s, \"run_ms\": [%.3f], \"outputs\": %zu, \"peak_rss_kb\": %ld}\n",
                  json_str(name).c_str(), json_str(method).c_str(), ms, outputs.size(), peak_rss_kb());
    } catch (const UsageError& e) {
      error = e.msg;
    } catch (const RunError& e) {
      error = e.msg;
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) std::printf("SDXS_ERROR {\"message\": %s}\n", json_str(error).c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse_args(argc, argv);
    return a.serve ? serve(a) : run(a);
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
