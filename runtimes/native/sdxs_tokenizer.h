// CLIP byte-level BPE in C++: the same ids as runtimes/tokenizer.py (transformers' CLIPTokenizer) for
// every valid UTF-8 prompt. Unicode data (split-pattern classes, lowercase mappings, NFC) come from
// unicode_tables.inc, generated from the Python side's own sources by gen_unicode_tables.py.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace sdxs {

// A tokenizer folder that is missing or malformed.
struct TokenizerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A prompt that is not valid UTF-8.
struct PromptError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  // Reads vocab.json, merges.txt and the pad token (special_tokens_map.json, else tokenizer_config.json).
  Tokenizer(const std::string& folder, int max_length);

  // Content ids of `utf8` (no start/end tokens, no truncation). Throws PromptError on invalid UTF-8.
  std::vector<int64_t> encode(const std::string& utf8);
  // max_length ids: start, content (truncated), end, pad. *untruncated: content + 2 before truncation.
  std::vector<int64_t> ids(const std::string& utf8, int* untruncated = nullptr);

  int max_length() const { return max_length_; }

 private:
  const std::vector<std::string>& bpe(const std::string& symbols);
  int64_t id_of(const std::string& token) const;

  std::unordered_map<std::string, int64_t> encoder_;
  std::unordered_map<std::string, int> ranks_;  // "first second" -> merge priority
  std::vector<std::u32string> specials_;         // start, end, pad; longest first
  std::unordered_map<std::string, std::vector<std::string>> cache_;
  int64_t bos_ = 0, eos_ = 0, pad_ = 0;
  int max_length_ = 77;
};

// Decodes UTF-8 (rejecting overlong forms, surrogates and code points past U+10FFFF); throws PromptError.
std::u32string utf8_decode(const std::string& s);
std::string utf8_encode(const std::u32string& s);

}  // namespace sdxs
