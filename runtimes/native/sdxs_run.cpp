// sdxs-run: one image from an sdxs-edge ExecuTorch bundle, through libsdxs (sdxs.h), with no Python.
//
//   sdxs-run BUNDLE "prompt" [--seed N] [--out image.png] [--width W] [--height H] [--no-verify]
//
// Writes a PNG (stb_image_write; via a temporary file renamed into place, so a failed run leaves no
// partial image) and prints one line: "sdxs-run: wrote PATH (WxH, seed N, T ms)". A prompt longer than
// the text encoder takes is truncated with a warning on stderr. Errors: one line
// "sdxs-run: error: ..." on stderr; exit 2 for bad arguments, 1 for everything else.
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO_DEFAULTS
#include <stb/stb_image_write.h>

#include "sdxs.h"

namespace {

const char* kUsage =
    "usage: sdxs-run BUNDLE PROMPT [--seed N] [--out image.png] [--width W] [--height H] [--no-verify]\n"
    "  BUNDLE       an sdxs-edge executorch bundle folder (manifest.json, *.pte, tokenizer/)\n"
    "  PROMPT       UTF-8 text\n"
    "  --seed N     noise seed, 0..2^64-1 (default 0): torch.randn's CPU stream for that seed\n"
    "  --out PATH   PNG to write (default sdxs.png)\n"
    "  --width W, --height H   the image size; must be the bundle's (default: the bundle's)\n"
    "  --no-verify  skip the sha256 check of the programs\n";

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "sdxs-run: error: %s\n", msg.c_str());
  return 2;
}

bool parse_u64(const char* s, unsigned long long* v) {
  if (!*s || *s == '-') return false;
  char* end = nullptr;
  errno = 0;
  *v = std::strtoull(s, &end, 10);
  return errno == 0 && *end == '\0';
}

// Appends PNG bytes to a std::vector (stb's callback).
void append(void* ctx, void* data, int size) {
  auto* buf = static_cast<std::vector<unsigned char>*>(ctx);
  const auto* p = static_cast<const unsigned char*>(data);
  buf->insert(buf->end(), p, p + size);
}

// Writes `bytes` to path via path.tmp-<pid>, renamed into place; an error message or "".
std::string write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
  const std::string tmp = path + ".tmp-" + std::to_string(getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) return "cannot write " + path + ": " + std::strerror(errno);
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!ok || !closed || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    return "cannot write " + path + ": " + why;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  unsigned long long seed = 0, w = 0, h = 0;
  bool have_w = false, have_h = false;
  unsigned flags = 0;
  std::string out = "sdxs.png";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--no-verify") {
      flags |= SDXS_OPEN_NO_VERIFY;
      continue;
    }
    if (a == "--seed" || a == "--out" || a == "--width" || a == "--height") {
      if (i + 1 >= argc) return usage_error(a + " needs a value");
      const char* v = argv[++i];
      if (a == "--out") {
        out = v;
      } else {
        unsigned long long* dst = a == "--seed" ? &seed : a == "--width" ? &w : &h;
        if (!parse_u64(v, dst) || (a != "--seed" && (*dst < 1 || *dst > 65536)))
          return usage_error(a + " expects " + (a == "--seed" ? "an integer 0..2^64-1" : "a size 1..65536") + ", got '" + v + "'");
        if (a == "--width") have_w = true;
        if (a == "--height") have_h = true;
      }
      continue;
    }
    if (a.size() > 1 && a[0] == '-' && a[1] == '-') return usage_error("unknown option '" + a + "' (see --help)");
    pos.push_back(a);
  }
  if (pos.size() != 2) return usage_error("expected BUNDLE and PROMPT (see --help)");
  if (out.empty()) return usage_error("--out must not be empty");

  sdxs_ctx* ctx = sdxs_open_flags(pos[0].c_str(), flags);
  if (!ctx) {
    std::fprintf(stderr, "sdxs-run: error: %s\n", sdxs_last_error());
    return 1;
  }
  int bw = 0, bh = 0, max_length = 0;
  sdxs_image_size(ctx, &bw, &bh);
  sdxs_max_length(ctx, &max_length);
  const int width = have_w ? static_cast<int>(w) : bw, height = have_h ? static_cast<int>(h) : bh;
  std::vector<int64_t> ids(static_cast<size_t>(max_length));
  int length = 0;
  int rc = sdxs_tokenize(ctx, pos[1].c_str(), ids.data(), &length);
  if (rc == SDXS_OK && length > max_length)
    std::fprintf(stderr, "sdxs-run: warning: the prompt is %d tokens; the text encoder takes %d, the rest is truncated\n", length, max_length);
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * static_cast<size_t>(height) * 3);
  const auto t0 = std::chrono::steady_clock::now();
  if (rc == SDXS_OK) rc = sdxs_generate(ctx, pos[1].c_str(), seed, width, height, rgb.data());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::string error = rc == SDXS_OK ? "" : sdxs_last_error();
  sdxs_close(ctx);
  if (!error.empty()) {
    std::fprintf(stderr, "sdxs-run: error: %s\n", error.c_str());
    return 1;
  }
  std::vector<unsigned char> png;
  if (!stbi_write_png_to_func(append, &png, width, height, 3, rgb.data(), width * 3)) {
    std::fprintf(stderr, "sdxs-run: error: PNG encoding failed\n");
    return 1;
  }
  error = write_file(out, png);
  if (!error.empty()) {
    std::fprintf(stderr, "sdxs-run: error: %s\n", error.c_str());
    return 1;
  }
  std::printf("sdxs-run: wrote %s (%dx%d, seed %llu, %.1f ms)\n", out.c_str(), width, height, seed, ms);
  return 0;
}
