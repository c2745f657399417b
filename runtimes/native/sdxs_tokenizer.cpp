// CLIP BPE tokenizer (see sdxs_tokenizer.h); each step mirrors runtimes/tokenizer.py:
//   1. cut the special tokens (start, end, pad) out of the raw text, case-sensitively;
//   2. normalise every other segment: NFC, each whitespace run to one space, str.lower();
//   3. CLIP's split pattern (case-insensitive), then GPT-2's over each piece;
//   4. bytes -> printable symbols, BPE by merge rank, symbols -> ids.
#include "sdxs_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

namespace sdxs {
namespace {

#include "unicode_tables.inc"

template <typename T>
T range_lookup(const uint32_t* starts, const T* values, size_t n, char32_t c) {
  const size_t i = std::upper_bound(starts, starts + n, static_cast<uint32_t>(c)) - starts;
  return i == 0 ? T{} : values[i - 1];
}

uint32_t cls(char32_t c) { return range_lookup(kClassStart, kClassBits, kClassRanges, c); }
uint8_t ccc(char32_t c) { return range_lookup(kCccStart, kCcc, kCccRanges, c); }
bool case_ignorable(char32_t c) { return range_lookup(kCaseStart, kCaseBits, kCaseRanges, c) & 1; }
bool cased(char32_t c) { return range_lookup(kCaseStart, kCaseBits, kCaseRanges, c) & 2; }

// ---- NFC -----------------------------------------------------------------------------------------
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

void decompose(char32_t c, std::u32string& out) {
  if (c >= kSBase && c < kSBase + kSCount) {
    const int s = static_cast<int>(c - kSBase);
    out += kLBase + s / kNCount;
    out += kVBase + (s % kNCount) / kTCount;
    if (s % kTCount) out += kTBase + s % kTCount;
    return;
  }
  const auto* end = kDecomp + kDecompCount;
  const auto* it = std::lower_bound(kDecomp, end, static_cast<uint32_t>(c), [](const uint32_t* row, uint32_t v) { return row[0] < v; });
  if (it == end || (*it)[0] != c) {
    out += c;
    return;
  }
  decompose((*it)[1], out);
  if ((*it)[2]) decompose((*it)[2], out);
}

char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount) return a + (b - kTBase);
  const auto* end = kComp + kCompCount;
  const auto* it = std::lower_bound(kComp, end, std::make_pair(static_cast<uint32_t>(a), static_cast<uint32_t>(b)),
                                    [](const uint32_t* row, const std::pair<uint32_t, uint32_t>& v) { return std::make_pair(row[0], row[1]) < v; });
  return (it != end && (*it)[0] == a && (*it)[1] == b) ? (*it)[2] : 0;
}

std::u32string nfc(const std::u32string& s) {
  std::u32string d;
  for (char32_t c : s) decompose(c, d);
  // Canonical order: stable sort of every run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (!ccc(d[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && ccc(d[j])) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j, [](char32_t a, char32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  if (d.empty()) return d;
  size_t starter = 0, out = 1;
  int last = ccc(d[0]) ? 256 : 0;
  for (size_t i = 1; i < d.size(); ++i) {
    const char32_t c = d[i];
    const int cc = ccc(c);
    const char32_t composite = compose(d[starter], c);
    if (composite && (last < cc || last == 0)) {
      d[starter] = composite;
      continue;
    }
    if (cc == 0) starter = out;
    last = cc;
    d[out++] = c;
  }
  d.resize(out);
  return d;
}

// ---- str.lower() -----------------------------------------------------------------------------------
// CPython's final-sigma rule: capital sigma after a cased letter (case-ignorables skipped) and not
// before one becomes the final form.
char32_t lower_sigma(const std::u32string& s, size_t i) {
  size_t j = i;
  char32_t c = 0;
  bool found = false;
  while (j > 0) {
    c = s[--j];
    if (!case_ignorable(c)) {
      found = true;
      break;
    }
  }
  bool final_sigma = found && cased(c);
  if (final_sigma && i + 1 < s.size()) {
    size_t k = i + 1;
    for (; k < s.size(); ++k)
      if (!case_ignorable(s[k])) break;
    final_sigma = k == s.size() || !cased(s[k]);
  }
  return final_sigma ? 0x3C2 : 0x3C3;
}

std::u32string lower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t c = s[i];
    if (c == 0x3A3) {
      out += lower_sigma(s, i);
      continue;
    }
    const auto* end = kLower + kLowerCount;
    const auto* it = std::lower_bound(kLower, end, static_cast<uint32_t>(c), [](const uint32_t* row, uint32_t v) { return row[0] < v; });
    if (it == end || (*it)[0] != c) {
      out += c;
      continue;
    }
    for (int k = 1; k < 4 && (*it)[k]; ++k) out += static_cast<char32_t>((*it)[k]);
  }
  return out;
}

std::u32string normalize(const std::u32string& s) {
  const std::u32string n = nfc(s);
  std::u32string w;
  for (size_t i = 0; i < n.size();) {
    if (cls(n[i]) & kWS) {
      while (i < n.size() && (cls(n[i]) & kWS)) ++i;
      w += U' ';
    } else {
      w += n[i++];
    }
  }
  return lower(w);
}

// ---- the split patterns ------------------------------------------------------------------------
// Case-insensitive match of an ASCII literal (CLIP's pattern has the IGNORECASE flag).
bool ci_char(char32_t c, char want) {
  if (c == static_cast<char32_t>(static_cast<unsigned char>(want))) return true;
  if (want < 'a' || want > 'z') return false;
  const auto* end = kCiLetter + kCiCount;
  const auto* it = std::lower_bound(kCiLetter, end, static_cast<uint32_t>(c), [](const uint32_t* row, uint32_t v) { return row[0] < v; });
  return it != end && (*it)[0] == c && (*it)[1] == static_cast<uint32_t>(want);
}

size_t literal_at(const std::u32string& s, size_t i, const char* lit, bool ci) {
  size_t n = 0;
  for (; lit[n]; ++n) {
    if (i + n >= s.size()) return 0;
    const bool ok = ci ? ci_char(s[i + n], lit[n]) : s[i + n] == static_cast<char32_t>(static_cast<unsigned char>(lit[n]));
    if (!ok) return 0;
  }
  return n;
}

const char* const kContractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};

size_t run_of(const std::u32string& s, size_t i, uint32_t bit) {
  size_t j = i;
  while (j < s.size() && (cls(s[j]) & bit)) ++j;
  return j - i;
}

// CLIP: <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ (IGNORECASE)
std::vector<std::u32string> clip_pieces(const std::u32string& s) {
  std::vector<std::u32string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = literal_at(s, i, "<|startoftext|>", true);
    if (!n) n = literal_at(s, i, "<|endoftext|>", true);
    for (const char* c : kContractions)
      if (!n) n = literal_at(s, i, c, true);
    if (!n) n = run_of(s, i, kCLIP_L);
    if (!n && (cls(s[i]) & kCLIP_N)) n = 1;
    if (!n) n = run_of(s, i, kCLIP_P);
    if (!n) {
      ++i;
      continue;
    }
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::u32string> gpt2_pieces(const std::u32string& s) {
  std::vector<std::u32string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = 0;
    for (const char* c : kContractions)
      if (!n) n = literal_at(s, i, c, false);
    // " ?X+": a space is never in X, so the form without the space cannot match where this one fails.
    for (const uint32_t bit : {kGPT2_L, kGPT2_N, kGPT2_P}) {
      if (n) break;
      const size_t sp = s[i] == U' ' ? 1 : 0;
      const size_t r = run_of(s, i + sp, bit);
      if (r) n = sp + r;
    }
    if (!n) {
      const size_t ws = run_of(s, i, kWS);
      if (ws) n = (i + ws < s.size() && ws > 1) ? ws - 1 : ws;  // \s+(?!\S) backs off one before a non-space
    }
    if (!n) {
      ++i;
      continue;
    }
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

// OpenAI CLIP's reversible byte -> printable code point map.
const std::vector<std::string>& byte_symbols() {
  static const std::vector<std::string> table = [] {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<char32_t> cp(256, 0);
    for (int b : bs) cp[b] = static_cast<char32_t>(b);
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) cp[b] = static_cast<char32_t>(256 + n++);
    std::vector<std::string> out(256);
    for (int b = 0; b < 256; ++b) out[b] = utf8_encode(std::u32string(1, cp[b]));
    return out;
  }();
  return table;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw TokenizerError("tokenizer file " + path + " is missing");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool is_file(const std::string& path) { return static_cast<bool>(std::ifstream(path)); }

std::vector<std::string> split_ws(const std::string& line) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : line) {
    if (c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f') {
      if (!cur.empty()) parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) parts.push_back(cur);
  return parts;
}

}  // namespace

std::u32string utf8_decode(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    int n = b0 < 0x80 ? 1 : (b0 >> 5) == 6 ? 2 : (b0 >> 4) == 14 ? 3 : (b0 >> 3) == 30 ? 4 : 0;
    if (!n || i + n > s.size()) throw PromptError("the prompt is not valid UTF-8 (byte " + std::to_string(i) + ")");
    char32_t c = n == 1 ? b0 : n == 2 ? (b0 & 0x1F) : n == 3 ? (b0 & 0x0F) : (b0 & 0x07);
    for (int k = 1; k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b >> 6) != 2) throw PromptError("the prompt is not valid UTF-8 (byte " + std::to_string(i + k) + ")");
      c = (c << 6) | (b & 0x3F);
    }
    const char32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < min[n] || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000))
      throw PromptError("the prompt is not valid UTF-8 (byte " + std::to_string(i) + ")");
    out += c;
    i += n;
  }
  return out;
}

std::string utf8_encode(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

Tokenizer::Tokenizer(const std::string& folder, int max_length) : max_length_(max_length) {
  if (max_length < 2) throw TokenizerError("max_length must be at least 2, got " + std::to_string(max_length));
  const std::string vocab_f = folder + "/vocab.json", merges_f = folder + "/merges.txt";
  const std::string vocab_text = read_file(vocab_f), merges_text = read_file(merges_f);
  nlohmann::json vocab = nlohmann::json::parse(vocab_text, nullptr, false);
  if (vocab.is_discarded() || !vocab.is_object()) throw TokenizerError(vocab_f + ": not a JSON object of token ids");
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) throw TokenizerError(vocab_f + ": the id of token " + it.key() + " is not an integer");
    encoder_[it.key()] = it.value().get<int64_t>();
  }
  std::istringstream lines(merges_text);
  std::string line;
  bool first = true;
  int rank = 0;
  while (std::getline(lines, line)) {
    if (first && line.rfind("#version", 0) == 0) {
      first = false;
      continue;
    }
    first = false;
    const auto parts = split_ws(line);
    if (parts.empty()) continue;
    if (parts.size() != 2) throw TokenizerError(merges_f + ": malformed merge line '" + line + "'");
    ranks_[parts[0] + " " + parts[1]] = rank++;  // a repeated pair keeps its last rank, as in Python
  }
  std::string pad = "<|endoftext|>";
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    const std::string f = folder + "/" + name;
    if (!is_file(f)) continue;
    const nlohmann::json j = nlohmann::json::parse(read_file(f), nullptr, false);
    if (j.is_discarded()) throw TokenizerError(f + ": invalid JSON");
    if (!j.is_object() || !j.contains("pad_token") || j["pad_token"].is_null()) continue;
    const auto& v = j["pad_token"];
    if (v.is_object() && v.contains("content") && v["content"].is_string()) pad = v["content"].get<std::string>();
    else if (v.is_string()) pad = v.get<std::string>();
    else throw TokenizerError(f + ": pad_token is neither a string nor {\"content\": ...}");
    break;
  }
  for (const std::string& tok : {std::string("<|startoftext|>"), std::string("<|endoftext|>"), pad})
    if (!encoder_.count(tok)) throw TokenizerError(vocab_f + ": special token '" + tok + "' is not in the vocabulary");
  bos_ = encoder_.at("<|startoftext|>");
  eos_ = encoder_.at("<|endoftext|>");
  pad_ = encoder_.at(pad);
  for (const std::string& t : {std::string("<|startoftext|>"), std::string("<|endoftext|>"), pad}) {
    const std::u32string u = utf8_decode(t);
    if (std::find(specials_.begin(), specials_.end(), u) == specials_.end()) specials_.push_back(u);
  }
  std::stable_sort(specials_.begin(), specials_.end(), [](const std::u32string& a, const std::u32string& b) { return a.size() > b.size(); });
}

int64_t Tokenizer::id_of(const std::string& token) const {
  const auto it = encoder_.find(token);
  if (it == encoder_.end()) throw TokenizerError("token '" + token + "' is not in the vocabulary");
  return it->second;
}

const std::vector<std::string>& Tokenizer::bpe(const std::string& symbols) {
  const auto hit = cache_.find(symbols);
  if (hit != cache_.end()) return hit->second;
  const std::u32string u = utf8_decode(symbols);
  std::vector<std::string> word;
  for (char32_t c : u) word.push_back(utf8_encode(std::u32string(1, c)));
  word.back() += "</w>";
  while (word.size() > 1) {
    int best = std::numeric_limits<int>::max();
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const auto r = ranks_.find(word[i] + " " + word[i + 1]);
      if (r != ranks_.end() && r->second < best) {
        best = r->second;
        best_i = i;
      }
    }
    if (best == std::numeric_limits<int>::max()) break;
    const std::string first = word[best_i], second = word[best_i + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        merged.push_back(first + second);
        i += 2;
      } else {
        merged.push_back(word[i++]);
      }
    }
    word.swap(merged);
  }
  return cache_.emplace(symbols, std::move(word)).first->second;
}

std::vector<int64_t> Tokenizer::encode(const std::string& utf8) {
  const std::u32string text = utf8_decode(utf8);
  const auto& sym = byte_symbols();
  std::vector<int64_t> ids;
  auto encode_segment = [&](const std::u32string& segment) {
    for (const auto& clip : clip_pieces(normalize(segment))) {
      for (const auto& piece : gpt2_pieces(clip)) {
        std::string symbols;
        for (unsigned char b : utf8_encode(piece)) symbols += sym[b];
        for (const auto& t : bpe(symbols)) ids.push_back(id_of(t));
      }
    }
  };
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    const std::u32string* hit = nullptr;
    for (const auto& sp : specials_)
      if (text.compare(i, sp.size(), sp) == 0) {
        hit = &sp;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    encode_segment(text.substr(start, i - start));
    ids.push_back(id_of(utf8_encode(*hit)));
    i += hit->size();
    start = i;
  }
  encode_segment(text.substr(start));
  return ids;
}

std::vector<int64_t> Tokenizer::ids(const std::string& utf8, int* untruncated) {
  std::vector<int64_t> content = encode(utf8);
  if (untruncated) *untruncated = static_cast<int>(content.size()) + 2;
  const size_t room = static_cast<size_t>(max_length_ - 2);
  if (content.size() > room) content.resize(room);
  std::vector<int64_t> out(static_cast<size_t>(max_length_), pad_);
  out[0] = bos_;
  std::copy(content.begin(), content.end(), out.begin() + 1);
  out[content.size() + 1] = eos_;
  return out;
}

}  // namespace sdxs
