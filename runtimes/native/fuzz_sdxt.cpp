// Fuzz harness for sdxt.h (the SDXT tensor reader and the --serve request parser), compiled with
// -fsanitize=address,undefined by build_fuzz.sh. tests/test_fuzz.py feeds it inputs drawn by hypothesis;
// any out-of-bounds access, leak, overflow or other undefined behaviour aborts it with a sanitizer
// report, which the test turns into a failure.
//
//   fuzz_sdxt read FILE...          read each FILE as a tensor; print "ok DTYPE SHAPE BYTES" or "error MSG"
//   fuzz_sdxt serve NAME...         serve programs NAME... with no model: each stdin line is parsed as a
//                                   request; a valid one reads DIR/in0.bin; one "ok"/"error" line each
//
// Exit 0 whatever the inputs; sanitizer findings exit non-zero (-fno-sanitize-recover).
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "sdxt.h"

namespace {

void report(const sdxs::RawTensor& t) {
  std::cout << "ok " << t.dtype << " " << sdxs::shape_str(t.dims) << " " << t.data.size() << "\n";
}

int read_files(int argc, char** argv) {
  for (int i = 2; i < argc; ++i) {
    try {
      report(sdxs::read_tensor(argv[i]));
    } catch (const sdxs::UsageError& e) {
      std::cout << "error " << sdxs::json_str(e.msg) << "\n";
    } catch (const std::bad_alloc&) {
      std::cout << "error out of memory\n";
    }
  }
  return 0;
}

int serve(int argc, char** argv) {
  std::vector<std::pair<std::string, std::string>> programs;
  for (int i = 2; i < argc; ++i) programs.emplace_back(argv[i], "");
  std::string line;
  while (std::getline(std::cin, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line == "quit") break;
    try {
      const auto req = sdxs::parse_request(line, programs);
      std::cout << "request " << req.program << " ";
      report(sdxs::read_tensor(req.io + "/in0.bin"));
    } catch (const sdxs::UsageError& e) {
      std::cout << "error " << sdxs::json_str(e.msg) << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "read") return read_files(argc, argv);
  if (mode == "serve") return serve(argc, argv);
  std::cerr << "usage: fuzz_sdxt read FILE... | fuzz_sdxt serve NAME...\n";
  return 2;
}
