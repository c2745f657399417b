// libsdxs (sdxs.h): an sdxs-edge ExecuTorch bundle from prompt to pixels in C++.
//
// What runtimes/base.py does in Python, step for step: load_manifest's checks (sdxs_edge/bundle.py),
// the CLIP tokenizer (sdxs_tokenizer.cpp), the default noise (sdxs_noise.h), the one-step rule
// (sdxs_edge/sampler.py: x_in = noise * input_scale; x0 = noise * sigma - sigma * eps, or the
// v-prediction form) and the uint8 conversion (runtimes/base.py: to_uint8). Float arithmetic is done
// one rounding per operation, as numpy does it (build with -ffp-contract=off).
#include "sdxs.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/platform/platform.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "sdxs_noise.h"
#include "sdxs_tokenizer.h"

using executorch::aten::ScalarType;
using executorch::extension::make_tensor_ptr;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using json = nlohmann::json;

// libexecutorch_threadpool's ThreadPool (extension/threadpool/threadpool.h, which the wheel does not
// ship; runner.cpp does the same): only these two members are called.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

constexpr const char* kFormat = "sdxs-edge-bundle";
constexpr int kFormatVersion = 1;
const char* const kComponents[] = {"text_encoder", "unet", "decoder"};

struct Failure {
  int code;
  std::string msg;
};

thread_local std::string g_error;
thread_local int g_code = SDXS_OK;

int fail(int code, const std::string& msg) {
  g_code = code;
  g_error = msg;
  return code;
}

// Runs `f`, turning every exception into an error code and message (nothing crosses the C boundary).
template <typename F>
int guarded(F&& f) {
  try {
    f();
    g_code = SDXS_OK;
    g_error.clear();
    return SDXS_OK;
  } catch (const Failure& e) {
    return fail(e.code, e.msg);
  } catch (const sdxs::PromptError& e) {
    return fail(SDXS_E_PROMPT, e.what());
  } catch (const sdxs::TokenizerError& e) {
    return fail(SDXS_E_BUNDLE, e.what());
  } catch (const std::bad_alloc&) {
    return fail(SDXS_E_RUNTIME, "out of memory");
  } catch (const std::exception& e) {
    return fail(SDXS_E_RUNTIME, e.what());
  } catch (...) {
    return fail(SDXS_E_RUNTIME, "unknown error");
  }
}

[[noreturn]] void raise(int code, const std::string& msg) { throw Failure{code, msg}; }

// ---- sha256 (FIPS 180-4) ---------------------------------------------------------------------------
class Sha256 {
 public:
  void update(const unsigned char* p, size_t n) {
    len_ += n;
    while (n) {
      const size_t take = std::min(n, size_t{64} - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == 64) {
        block(buf_);
        fill_ = 0;
      }
    }
  }
  std::string hex() {
    const uint64_t bits = len_ * 8;
    const unsigned char pad = 0x80, zero = 0;
    update(&pad, 1);
    while (fill_ != 56) update(&zero, 1);
    unsigned char l[8];
    for (int i = 0; i < 8; ++i) l[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(l, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be,
        0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa,
        0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85,
        0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
        0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f,
        0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = uint32_t{p[4 * i]} << 24 | uint32_t{p[4 * i + 1]} << 16 | uint32_t{p[4 * i + 2]} << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    const uint32_t add[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += add[i];
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t fill_ = 0;
  uint64_t len_ = 0;
};

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) raise(SDXS_E_BUNDLE, path + " cannot be read");
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(reinterpret_cast<const unsigned char*>(buf.data()), static_cast<size_t>(f.gcount()));
  }
  return h.hex();
}

// ---- the manifest ----------------------------------------------------------------------------------
struct Spec {
  std::string name, dtype;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct Component {
  std::string name, file;
  std::vector<Spec> inputs, outputs;
  std::unique_ptr<Module> module;
};

const json& need(const json& obj, const char* key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key)) raise(SDXS_E_BUNDLE, "manifest " + where + ": missing key '" + key + "'");
  return obj[key];
}

std::string need_str(const json& obj, const char* key, const std::string& where) {
  const json& v = need(obj, key, where);
  if (!v.is_string()) raise(SDXS_E_BUNDLE, "manifest " + where + "." + key + ": expected a string");
  return v.get<std::string>();
}

double need_num(const json& obj, const char* key, const std::string& where) {
  const json& v = need(obj, key, where);
  if (!v.is_number()) raise(SDXS_E_BUNDLE, "manifest " + where + "." + key + ": expected a number");
  return v.get<double>();
}

std::vector<Spec> read_specs(const json& list, const std::string& where) {
  if (!list.is_array()) raise(SDXS_E_BUNDLE, "manifest " + where + ": expected an array");
  std::vector<Spec> out;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string w = where + "[" + std::to_string(i) + "]";
    Spec s{need_str(list[i], "name", w), need_str(list[i], "dtype", w), {}};
    const json& shape = need(list[i], "shape", w);
    if (!shape.is_array() || shape.empty()) raise(SDXS_E_BUNDLE, "manifest " + w + ".shape: expected a non-empty array");
    for (const auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 1 || d.get<int64_t>() > (int64_t{1} << 31))
        raise(SDXS_E_BUNDLE, "manifest " + w + ".shape: expected positive integers");
      s.shape.push_back(d.get<int64_t>());
    }
    out.push_back(std::move(s));
  }
  return out;
}

// A file name inside the bundle: relative, without "..".
std::string inside(const std::string& dir, const std::string& rel, const std::string& what) {
  if (rel.empty() || rel[0] == '/' || ("/" + rel + "/").find("/../") != std::string::npos)
    raise(SDXS_E_BUNDLE, dir + ": " + what + " '" + rel + "' is not a path inside the bundle");
  return dir + "/" + rel;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) raise(SDXS_E_BUNDLE, path + " cannot be read");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ExecuTorch's log, routed here once per process (sdxs_open): info and debug lines are dropped (an app's
// stderr is not ours to fill), the last error line of the calling thread goes into our error message.
thread_local std::string g_et_log;

void et_log(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t, const char* message, size_t length) {
  if (level != kError && level != kFatal) return;
  g_et_log.assign(message, length);
  while (!g_et_log.empty() && (g_et_log.back() == '\n' || g_et_log.back() == '\r')) g_et_log.pop_back();
}

void route_executorch_log() {
  static std::once_flag once;
  std::call_once(once, [] { executorch::runtime::register_pal(executorch::runtime::PalImpl::create(et_log, __FILE__)); });
}

std::string err_str(Error e) {
  std::string s = "ExecuTorch error " + std::to_string(static_cast<int>(e));
  if (!g_et_log.empty()) s += ": " + g_et_log;
  g_et_log.clear();
  return s;
}

ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return ScalarType::Float;
  if (dtype == "int32") return ScalarType::Int;
  if (dtype == "int64") return ScalarType::Long;
  raise(SDXS_E_UNSUPPORTED, "tensors of dtype " + dtype + " (libsdxs runs bundles with float32 and int32/int64 I/O)");
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

struct sdxs_ctx {
  std::string dir;
  std::map<std::string, Component> comps;
  std::unique_ptr<sdxs::Tokenizer> tokenizer;
  float input_scale = 0, sigma = 0, timestep = 0;
  bool v_prediction = false;
  int width = 0, height = 0;

  const Component& comp(const std::string& name) const {
    const auto it = comps.find(name);
    if (it == comps.end()) raise(SDXS_E_ARGUMENT, "unknown component '" + name + "' (text_encoder, unet, decoder; encoder where the bundle has one)");
    return it->second;
  }

  void open(const std::string& bundle, bool verify) {
    dir = bundle;
    const std::string mf = dir + "/manifest.json";
    if (!std::ifstream(mf)) raise(SDXS_E_BUNDLE, dir + " is not a bundle (no manifest.json)");
    const json m = json::parse(read_text(mf), nullptr, false);
    if (m.is_discarded()) raise(SDXS_E_BUNDLE, mf + ": invalid JSON");
    if (!m.is_object()) raise(SDXS_E_BUNDLE, mf + ": not a JSON object");
    if (!m.contains("format") || m["format"] != kFormat) raise(SDXS_E_BUNDLE, mf + ": not an sdxs-edge bundle manifest (format is not '" + std::string(kFormat) + "')");
    if (!m.contains("format_version") || m["format_version"] != kFormatVersion)
      raise(SDXS_E_UNSUPPORTED, "manifest format version " + (m.contains("format_version") ? m["format_version"].dump() : std::string("(none)")) +
                                    " is not supported (libsdxs reads version " + std::to_string(kFormatVersion) + ")");
    const std::string target = need_str(m, "target", "$");
    if (target != "executorch") raise(SDXS_E_UNSUPPORTED, dir + " is a " + target + " bundle; libsdxs runs executorch bundles");
    std::string delegate = "xnnpack";
    if (m.contains("conversion") && m["conversion"].is_object() && m["conversion"].contains("config") && m["conversion"]["config"].is_object() &&
        m["conversion"]["config"].contains("delegate") && m["conversion"]["config"]["delegate"].is_string())
      delegate = m["conversion"]["config"]["delegate"].get<std::string>();
    if (delegate != "xnnpack") raise(SDXS_E_UNSUPPORTED, dir + " holds " + delegate + " programs; libsdxs links the XNNPACK delegate only");

    const json& sampler = need(m, "sampler", "$");
    input_scale = static_cast<float>(need_num(sampler, "input_scale", "$.sampler"));
    sigma = static_cast<float>(need_num(sampler, "sigma", "$.sampler"));
    timestep = static_cast<float>(need_num(sampler, "timestep", "$.sampler"));
    const std::string pt = need_str(sampler, "prediction_type", "$.sampler");
    if (pt != "epsilon" && pt != "v_prediction") raise(SDXS_E_BUNDLE, "manifest $.sampler.prediction_type: '" + pt + "' is not epsilon or v_prediction");
    v_prediction = pt == "v_prediction";

    const json& comps_j = need(m, "components", "$");
    if (!comps_j.is_object()) raise(SDXS_E_BUNDLE, "manifest $.components: expected an object");
    for (auto it = comps_j.begin(); it != comps_j.end(); ++it) {
      const std::string name = it.key();
      if (name == "controlnet") raise(SDXS_E_UNSUPPORTED, dir + " has a ControlNet; libsdxs runs bundles without one");
      // An encoder (image-to-image) is loaded for sdxs_run_component; generation here is text-to-image.
      if (name != "text_encoder" && name != "unet" && name != "decoder" && name != "encoder") raise(SDXS_E_BUNDLE, "manifest: unknown component '" + name + "'");
      const std::string w = "$.components." + name;
      Component c{name, need_str(it.value(), "file", w), read_specs(need(it.value(), "inputs", w), w + ".inputs"),
                  read_specs(need(it.value(), "outputs", w), w + ".outputs"), nullptr};
      const std::string path = inside(dir, c.file, name + " file");
      if (!std::ifstream(path)) raise(SDXS_E_BUNDLE, dir + ": " + name + " file " + c.file + " is missing");
      if (verify && sha256_file(path) != need_str(it.value(), "sha256", w)) raise(SDXS_E_BUNDLE, dir + ": " + name + " file " + c.file + " was altered (sha256 mismatch)");
      comps.emplace(name, std::move(c));
    }
    for (const char* name : kComponents)
      if (!comps.count(name)) raise(SDXS_E_BUNDLE, dir + ": the bundle has no " + std::string(name) + " component");
    check_io();

    const json& tok = need(m, "tokenizer", "$");
    const double max_length = need_num(tok, "max_length", "$.tokenizer");
    if (max_length != comp("text_encoder").inputs[0].shape.back())
      raise(SDXS_E_BUNDLE, "manifest: tokenizer max_length differs from the text encoder's input length");
    tokenizer = std::make_unique<sdxs::Tokenizer>(inside(dir, need_str(tok, "dir", "$.tokenizer"), "tokenizer dir"), static_cast<int>(max_length));
    // Largest program first: a program's weights are held twice while XNNPACK packs them (mapped file
    // pages and the packed copy), and that peak is lowest before the other programs are resident.
    std::vector<std::pair<std::uintmax_t, Component*>> order;
    for (auto& [name, c] : comps) {
      std::error_code ec;  // a file gone since the check above fails in load() with its own message
      const std::uintmax_t size = std::filesystem::file_size(dir + "/" + c.file, ec);
      order.emplace_back(ec ? 0 : size, &c);
    }
    std::stable_sort(order.begin(), order.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    for (auto& [size, c] : order) load(*c);
  }

  // The I/O this library feeds: batch 1, ids -> context, (x_in, context[, timestep]) -> eps, x0 -> image.
  // The U-Net of a bundle with an encoder takes its timestep third, float32 (1,): fed the sampler's.
  void check_io() {
    const Component &te = comps.at("text_encoder"), &un = comps.at("unet"), &de = comps.at("decoder");
    auto bad = [&](const std::string& what) { raise(SDXS_E_UNSUPPORTED, dir + ": " + what + " (libsdxs runs batch-1 bundles with float32 I/O)"); };
    const bool timed = un.inputs.size() == 3 && un.inputs[2].name == "timestep";
    if (te.inputs.size() != 1 || te.outputs.size() != 1 || (un.inputs.size() != 2 && !timed) || un.outputs.size() != 1 || de.inputs.size() != 1 || de.outputs.size() != 1)
      bad("unexpected component inputs/outputs");
    if (timed && (un.inputs[2].dtype != "float32" || un.inputs[2].shape != std::vector<int64_t>{1})) bad("a U-Net timestep other than float32 (1,)");
    if (te.inputs[0].dtype != "int32" && te.inputs[0].dtype != "int64") bad("token ids of dtype " + te.inputs[0].dtype);
    for (const auto* s : {&te.outputs[0], &un.inputs[0], &un.inputs[1], &un.outputs[0], &de.inputs[0], &de.outputs[0]})
      if (s->dtype != "float32") bad(s->name + " of dtype " + s->dtype);
    if (te.inputs[0].shape.size() != 2 || te.inputs[0].shape[0] != 1) bad("token ids of shape other than (1, L)");
    if (un.inputs[0].shape.size() != 4 || un.inputs[0].shape[0] != 1) bad("a latent of batch other than 1");
    if (un.outputs[0].shape != un.inputs[0].shape || de.inputs[0].shape != un.inputs[0].shape) raise(SDXS_E_BUNDLE, dir + ": the U-Net and decoder latent shapes differ");
    if (un.inputs[1].shape != te.outputs[0].shape) raise(SDXS_E_BUNDLE, dir + ": the U-Net context shape differs from the text encoder output");
    const auto& img = de.outputs[0].shape;
    if (img.size() != 4 || img[0] != 1 || img[1] != 3) bad("a decoder output other than (1, 3, H, W)");
    height = static_cast<int>(img[2]);
    width = static_cast<int>(img[3]);
  }

  // Loads the program (memory-mapped) and checks its method against the manifest.
  void load(Component& c) {
    const std::string path = dir + "/" + c.file;
    c.module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
    const Error le = c.module->load_method("forward");
    if (le != Error::Ok) raise(SDXS_E_RUNTIME, path + ": ExecuTorch cannot load method 'forward' (" + err_str(le) + ")");
    auto meta = c.module->method_meta("forward");
    if (!meta.ok()) raise(SDXS_E_RUNTIME, path + ": method_meta failed (" + err_str(meta.error()) + ")");
    if (meta->num_inputs() != c.inputs.size() || meta->num_outputs() != c.outputs.size())
      raise(SDXS_E_BUNDLE, path + ": the program's inputs/outputs do not match the manifest");
    for (size_t i = 0; i < c.inputs.size(); ++i) {
      auto info = meta->input_tensor_meta(i);
      if (!info.ok()) raise(SDXS_E_BUNDLE, path + ": input " + std::to_string(i) + " is not a tensor");
      const std::vector<int64_t> dims(info->sizes().begin(), info->sizes().end());
      if (dims != c.inputs[i].shape || info->scalar_type() != scalar_type(c.inputs[i].dtype))
        raise(SDXS_E_BUNDLE, path + ": input " + c.inputs[i].name + " differs from the manifest's dtype or shape");
    }
  }

  // Runs a component on raw buffers (positional, manifest layout); checks outputs are finite.
  void run(const std::string& name, const std::vector<const void*>& in, const std::vector<void*>& out) const {
    const Component& c = comp(name);
    std::vector<TensorPtr> tensors;
    std::vector<EValue> values;
    for (size_t i = 0; i < c.inputs.size(); ++i) {
      std::vector<executorch::aten::SizesType> sizes(c.inputs[i].shape.begin(), c.inputs[i].shape.end());
      tensors.push_back(make_tensor_ptr(std::move(sizes), const_cast<void*>(in[i]), scalar_type(c.inputs[i].dtype)));
      values.emplace_back(tensors.back());
    }
    auto res = c.module->execute("forward", values);
    if (!res.ok()) raise(SDXS_E_RUNTIME, name + ": executing the program failed (" + err_str(res.error()) + ")");
    if (res->size() != c.outputs.size()) raise(SDXS_E_RUNTIME, name + ": the program returned " + std::to_string(res->size()) + " outputs");
    for (size_t i = 0; i < c.outputs.size(); ++i) {
      const auto& t = (*res)[i].toTensor();
      const Spec& s = c.outputs[i];
      if (t.numel() != s.numel() || t.scalar_type() != scalar_type(s.dtype)) raise(SDXS_E_RUNTIME, name + ": output " + s.name + " differs from the manifest");
      if (!executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim())) raise(SDXS_E_RUNTIME, name + ": output " + s.name + " is not contiguous");
      std::memcpy(out[i], t.const_data_ptr(), t.nbytes());
      if (s.dtype == "float32") {
        const float* p = static_cast<const float*>(out[i]);
        for (int64_t k = 0; k < s.numel(); ++k)
          if (!std::isfinite(p[k])) raise(SDXS_E_RUNTIME, name + " produced non-finite values (NaN/Inf)");
      }
    }
  }

  void generate(const char* prompt, uint64_t seed, bool use_noise, sdxs_arrays* a) const {
    const auto t0 = std::chrono::steady_clock::now();
    const Component &te = comp("text_encoder"), &un = comp("unet"), &de = comp("decoder");
    const std::vector<int64_t> ids = tokenizer->ids(prompt);
    std::vector<int32_t> ids32(ids.begin(), ids.end());
    const int64_t n = un.inputs[0].numel();
    std::vector<float> noise;
    if (use_noise) {
      if (!a->noise) raise(SDXS_E_ARGUMENT, "use_noise is set but arrays->noise is NULL");
      noise.assign(a->noise, a->noise + n);
    } else {
      noise = sdxs::torch_randn(seed, n);
    }
    a->ms[0] = ms_since(t0);
    auto t = std::chrono::steady_clock::now();
    std::vector<float> context(static_cast<size_t>(te.outputs[0].numel()));
    const void* id_buf = te.inputs[0].dtype == "int64" ? static_cast<const void*>(ids.data()) : static_cast<const void*>(ids32.data());
    run("text_encoder", {id_buf}, {context.data()});
    a->ms[1] = ms_since(t);
    t = std::chrono::steady_clock::now();
    std::vector<float> x_in(static_cast<size_t>(n)), eps(static_cast<size_t>(n)), x0(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x_in[i] = noise[i] * input_scale;
    if (un.inputs.size() == 3)
      run("unet", {x_in.data(), context.data(), &timestep}, {eps.data()});
    else
      run("unet", {x_in.data(), context.data()}, {eps.data()});
    a->ms[2] = ms_since(t);
    t = std::chrono::steady_clock::now();
    if (!v_prediction) {
      for (int64_t i = 0; i < n; ++i) x0[i] = noise[i] * sigma - sigma * eps[i];
    } else {
      const float s2 = sigma * sigma + 1.0f;
      const float k = -sigma / std::sqrt(s2);
      for (int64_t i = 0; i < n; ++i) x0[i] = eps[i] * k + (noise[i] * sigma) / s2;
    }
    std::vector<float> image(static_cast<size_t>(de.outputs[0].numel()));
    run("decoder", {x0.data()}, {image.data()});
    if (a->rgb) to_rgb(image, a->rgb);
    a->ms[3] = ms_since(t);
    a->ms[4] = ms_since(t0);
    auto put = [](auto* dst, const auto& src) {
      if (dst) std::copy(src.begin(), src.end(), dst);
    };
    put(a->token_ids, ids);
    if (!use_noise) put(a->noise, noise);
    put(a->context, context);
    put(a->model_output, eps);
    put(a->latent, x0);
    put(a->image, image);
  }

  // (1, 3, H, W) in [-1, 1] -> H x W x 3 bytes: clip(x / 2 + 0.5, 0, 1) * 255, rounded half to even.
  void to_rgb(const std::vector<float>& image, uint8_t* rgb) const {
    const size_t plane = static_cast<size_t>(width) * static_cast<size_t>(height);
    for (size_t ch = 0; ch < 3; ++ch)
      for (size_t p = 0; p < plane; ++p) {
        float v = image[ch * plane + p] / 2.0f + 0.5f;
        v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
        rgb[p * 3 + ch] = static_cast<uint8_t>(std::nearbyint(v * 255.0f));
      }
  }
};

struct sdxs_tokenizer {
  std::unique_ptr<sdxs::Tokenizer> tok;
};

namespace {

void fill_ids(sdxs::Tokenizer& tok, const char* prompt, int64_t* ids_out, int* length) {
  if (!prompt || !ids_out) raise(SDXS_E_ARGUMENT, "prompt and ids_out must not be NULL");
  int n = 0;
  const auto ids = tok.ids(prompt, &n);
  std::copy(ids.begin(), ids.end(), ids_out);
  if (length) *length = n;
}

}  // namespace

extern "C" {

sdxs_ctx* sdxs_open_flags(const char* bundle_dir, unsigned flags) {
  sdxs_ctx* out = nullptr;
  guarded([&] {
    if (!bundle_dir) raise(SDXS_E_ARGUMENT, "bundle_dir must not be NULL");
    route_executorch_log();
    auto ctx = std::make_unique<sdxs_ctx>();
    ctx->open(bundle_dir, !(flags & SDXS_OPEN_NO_VERIFY));
    out = ctx.release();
  });
  return out;
}

sdxs_ctx* sdxs_open(const char* bundle_dir) { return sdxs_open_flags(bundle_dir, 0); }

int sdxs_generate(sdxs_ctx* ctx, const char* prompt, uint64_t seed, int width, int height, uint8_t* rgb_out) {
  return guarded([&] {
    if (!ctx || !prompt || !rgb_out) raise(SDXS_E_ARGUMENT, "ctx, prompt and rgb_out must not be NULL");
    if (width != ctx->width || height != ctx->height)
      raise(SDXS_E_SIZE, "the bundle makes " + std::to_string(ctx->width) + "x" + std::to_string(ctx->height) + " images; " + std::to_string(width) + "x" +
                             std::to_string(height) + " was asked");
    sdxs_arrays a{};
    a.rgb = rgb_out;
    ctx->generate(prompt, seed, false, &a);
  });
}

int sdxs_generate_arrays(sdxs_ctx* ctx, const char* prompt, uint64_t seed, int use_noise, sdxs_arrays* arrays) {
  return guarded([&] {
    if (!ctx || !prompt || !arrays) raise(SDXS_E_ARGUMENT, "ctx, prompt and arrays must not be NULL");
    ctx->generate(prompt, seed, use_noise != 0, arrays);
  });
}

int sdxs_run_component(sdxs_ctx* ctx, const char* component, const void* const* inputs, void* const* outputs) {
  return guarded([&] {
    if (!ctx || !component || !inputs || !outputs) raise(SDXS_E_ARGUMENT, "ctx, component, inputs and outputs must not be NULL");
    const Component& c = ctx->comp(component);
    std::vector<const void*> in(inputs, inputs + c.inputs.size());
    std::vector<void*> out(outputs, outputs + c.outputs.size());
    for (const void* p : in)
      if (!p) raise(SDXS_E_ARGUMENT, std::string(component) + ": an input buffer is NULL");
    for (void* p : out)
      if (!p) raise(SDXS_E_ARGUMENT, std::string(component) + ": an output buffer is NULL");
    ctx->run(component, in, out);
  });
}

int sdxs_image_size(const sdxs_ctx* ctx, int* width, int* height) {
  return guarded([&] {
    if (!ctx || !width || !height) raise(SDXS_E_ARGUMENT, "ctx, width and height must not be NULL");
    *width = ctx->width;
    *height = ctx->height;
  });
}

int sdxs_max_length(const sdxs_ctx* ctx, int* max_length) {
  return guarded([&] {
    if (!ctx || !max_length) raise(SDXS_E_ARGUMENT, "ctx and max_length must not be NULL");
    *max_length = ctx->tokenizer->max_length();
  });
}

int sdxs_tokenize(sdxs_ctx* ctx, const char* prompt, int64_t* ids_out, int* length) {
  return guarded([&] {
    if (!ctx) raise(SDXS_E_ARGUMENT, "ctx must not be NULL");
    fill_ids(*ctx->tokenizer, prompt, ids_out, length);
  });
}

int sdxs_noise(uint64_t seed, int64_t numel, float* out) {
  return guarded([&] {
    if (!out || numel < 0) raise(SDXS_E_ARGUMENT, "out must not be NULL and numel must be >= 0");
    const auto v = sdxs::torch_randn(seed, numel);
    std::copy(v.begin(), v.end(), out);
  });
}

int sdxs_threads(int n, int* threads) {
  return guarded([&] {
    auto* pool = executorch::extension::threadpool::get_threadpool();
    if (!pool) raise(SDXS_E_RUNTIME, "ExecuTorch has no threadpool in this build");
    if (n > 0 && !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n))) raise(SDXS_E_RUNTIME, "cannot resize the threadpool to " + std::to_string(n) + " threads");
    if (threads) *threads = static_cast<int>(pool->get_thread_count());
  });
}

const char* sdxs_last_error(void) { return g_error.c_str(); }
int sdxs_last_error_code(void) { return g_code; }

void sdxs_close(sdxs_ctx* ctx) { delete ctx; }

sdxs_tokenizer* sdxs_tokenizer_open(const char* folder, int max_length) {
  sdxs_tokenizer* out = nullptr;
  guarded([&] {
    if (!folder) raise(SDXS_E_ARGUMENT, "folder must not be NULL");
    out = new sdxs_tokenizer{std::make_unique<sdxs::Tokenizer>(folder, max_length)};
  });
  return out;
}

int sdxs_tokenizer_ids(sdxs_tokenizer* tok, const char* prompt, int64_t* ids_out, int* length) {
  return guarded([&] {
    if (!tok) raise(SDXS_E_ARGUMENT, "tok must not be NULL");
    fill_ids(*tok->tok, prompt, ids_out, length);
  });
}

void sdxs_tokenizer_close(sdxs_tokenizer* tok) { delete tok; }

}  // extern "C"
