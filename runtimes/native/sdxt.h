// The untrusted-input half of sdxs_runner: the SDXT tensor file reader and the --serve request parser.
//
// Both read bytes another process wrote (tensor files in a shared folder, request lines on stdin), so
// they are kept free of ExecuTorch and compiled on their own into the sanitised fuzz harness
// (runtimes/native/fuzz_sdxt.cpp, build_fuzz.sh; tests/test_fuzz.py feeds it). The file format and the
// protocol are described in the header of runner.cpp.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sdxs {

constexpr char kMagic[4] = {'S', 'D', 'X', 'T'};
constexpr uint32_t kMaxDims = 16;
constexpr int64_t kMaxTensorBytes = int64_t{1} << 34;  // 16 GiB: far above any model tensor, far below overflow

// Bad arguments or input files: exit 2. A program that fails to load or run: exit 1.
struct UsageError {
  std::string msg;
};
struct RunError {
  std::string msg;
};

// Element size of the dtypes the file format allows; 0 for any other code.
inline size_t dtype_size(uint32_t code) {
  switch (code) {
    case 0: case 1: case 11: return 1;  // uint8, int8, bool
    case 2: case 5: return 2;           // int16, float16
    case 3: case 6: return 4;           // int32, float32
    case 4: case 7: return 8;           // int64, float64
    default: return 0;
  }
}

inline std::string shape_str(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? "," : "") << dims[i];
  s << "]";
  return s.str();
}

struct RawTensor {
  uint32_t dtype = 0;
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

// Reads exactly n bytes at the current offset; false on end of file or error.
inline bool read_exact(int fd, void* buf, size_t n) {
  char* c = static_cast<char*>(buf);
  while (n) {
    const ssize_t r = ::read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r, n -= static_cast<size_t>(r);
  }
  return true;
}

// One SDXT file, checked field by field before anything is allocated from it: a regular file, the
// magic, a known dtype, at most kMaxDims dimensions each in [0, INT32_MAX], a byte count that neither
// overflows nor exceeds kMaxTensorBytes, and a file size equal to header + data.
inline RawTensor read_tensor(const std::string& path) {
  struct Fd {
    int fd;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  } f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw UsageError{path + ": cannot open (missing input file?)"};
  struct stat st {};
  if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) throw UsageError{path + ": not a regular file"};
  const int64_t file_size = st.st_size;
  char magic[4];
  uint32_t head[2];
  if (!read_exact(f.fd, magic, 4) || !read_exact(f.fd, head, 8))
    throw UsageError{path + ": truncated header (" + std::to_string(file_size) + " bytes)"};
  if (std::memcmp(magic, kMagic, 4) != 0) throw UsageError{path + ": not an SDXT tensor file (bad magic)"};
  RawTensor t;
  t.dtype = head[0];
  const uint32_t ndim = head[1];
  const size_t esize = dtype_size(t.dtype);
  if (esize == 0) throw UsageError{path + ": unsupported dtype code " + std::to_string(t.dtype)};
  if (ndim > kMaxDims) throw UsageError{path + ": ndim " + std::to_string(ndim) + " exceeds " + std::to_string(kMaxDims)};
  t.dims.resize(ndim);
  if (ndim && !read_exact(f.fd, t.dims.data(), 8 * ndim)) throw UsageError{path + ": truncated header (dims)"};
  const int64_t limit = kMaxTensorBytes / static_cast<int64_t>(esize);  // elements
  int64_t numel = 1;
  for (int64_t d : t.dims) {
    if (d < 0 || d > INT32_MAX) throw UsageError{path + ": bad dimension in shape " + shape_str(t.dims)};
    if (d && numel > limit / d) throw UsageError{path + ": shape " + shape_str(t.dims) + " is larger than " + std::to_string(kMaxTensorBytes) + " bytes"};
    numel *= d;
  }
  const int64_t header = 12 + 8 * static_cast<int64_t>(ndim);
  const int64_t nbytes = numel * static_cast<int64_t>(esize);
  if (file_size != header + nbytes)
    throw UsageError{path + ": " + std::to_string(file_size) + " bytes, expected " + std::to_string(header + nbytes) +
                     " for dtype " + std::to_string(t.dtype) + " shape " + shape_str(t.dims)};
  t.data.resize(static_cast<size_t>(nbytes));
  if (nbytes && !read_exact(f.fd, t.data.data(), static_cast<size_t>(nbytes))) throw UsageError{path + ": read failed (file changed while reading?)"};
  return t;
}

// A string as a JSON string literal (error messages carry paths, quotes and request bytes).
inline std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (const unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

constexpr size_t kMaxRequest = 8192;  // a request line: "run NAME DIR"

// One --serve request line "run NAME DIR" -> (index of NAME in programs, DIR). The folder may hold
// spaces (the rest of the line); NUL bytes and over-long lines are refused. Throws UsageError naming
// the problem (with at most 200 bytes of the line).
// One serve request: program index, io folder, and the method ("" for the runner's --method).
struct Request {
  size_t program;
  std::string io;
  std::string method;
};

// 'run NAME DIR' or 'run-method NAME METHOD DIR' (a bundle of several image sizes has one method per
// size: forward, forward_<W>x<H>, ...).
inline Request parse_request(const std::string& line, const std::vector<std::pair<std::string, std::string>>& programs) {
  const std::string shown = line.size() > 200 ? line.substr(0, 200) + "..." : line;
  if (line.size() > kMaxRequest) throw UsageError{"request of " + std::to_string(line.size()) + " bytes; at most " + std::to_string(kMaxRequest)};
  if (line.find('\0') != std::string::npos) throw UsageError{"bad request '" + shown + "': it holds a NUL byte"};
  std::istringstream req(line);
  std::string verb, name, method, io;
  req >> verb >> name;
  if (verb == "run-method") req >> method;
  std::getline(req >> std::ws, io);  // the folder may hold spaces: the rest of the line
  if ((verb != "run" && verb != "run-method") || name.empty() || io.empty() || (verb == "run-method" && method.empty()))
    throw UsageError{"bad request '" + shown + "': expected 'run NAME DIR', 'run-method NAME METHOD DIR' or 'quit'"};
  for (size_t k = 0; k < programs.size(); ++k)
    if (programs[k].first == name) return {k, io, method};
  std::string have;
  for (const auto& p : programs) have += (have.empty() ? "" : ", ") + p.first;
  throw UsageError{"no program '" + (name.size() > 100 ? name.substr(0, 100) + "..." : name) + "' (serving: " + have + ")"};
}

}  // namespace sdxs
