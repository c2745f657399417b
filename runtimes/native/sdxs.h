/* libsdxs: prompt in, pixels out, from an sdxs-edge ExecuTorch bundle, with no Python.
 *
 * The library reads the bundle's manifest.json (format version 1, target "executorch", XNNPACK
 * programs), checks every program's sha256 and its method signature against the manifest, and runs
 * the whole SDXS one-step generation in C++: the CLIP BPE tokenizer over the bundle's tokenizer files,
 * the default noise (the stream of torch.randn(shape, generator=torch.Generator().manual_seed(seed))
 * on the CPU), the text encoder, one U-Net evaluation, the one-step rule and the decoder.
 *
 * Every function returns SDXS_OK (0) or an error code, and never throws or aborts on bad input; the
 * message of the last error on the calling thread is sdxs_last_error(). A context is used by one thread
 * at a time. See docs/c-api.md for an example.
 */
#ifndef SDXS_H
#define SDXS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum sdxs_status {
  SDXS_OK = 0,
  SDXS_E_ARGUMENT = 1,    /* a NULL pointer or an unknown name */
  SDXS_E_BUNDLE = 2,      /* not a bundle, malformed manifest, missing or altered program, bad tokenizer files */
  SDXS_E_UNSUPPORTED = 3, /* another format version, target, delegate, batch size, I/O dtype or a ControlNet */
  SDXS_E_PROMPT = 4,      /* the prompt is not valid UTF-8 */
  SDXS_E_SIZE = 5,        /* the bundle does not make images of the size asked */
  SDXS_E_RUNTIME = 6      /* ExecuTorch failed to load or run a program, or produced NaN/Inf */
};

typedef struct sdxs_ctx sdxs_ctx;

/* Opens a bundle folder: reads and checks the manifest, verifies each program's sha256, loads the
 * tokenizer and the three programs. NULL on failure (see sdxs_last_error / sdxs_last_error_code). */
sdxs_ctx* sdxs_open(const char* bundle_dir);

#define SDXS_OPEN_NO_VERIFY 1u /* skip the sha256 check of the programs */
sdxs_ctx* sdxs_open_flags(const char* bundle_dir, unsigned flags);

/* One image: prompt (UTF-8) and seed -> width * height * 3 bytes of RGB (row-major, no padding).
 * width and height must be the bundle's image size (sdxs_image_size). */
int sdxs_generate(sdxs_ctx* ctx, const char* prompt, uint64_t seed, int width, int height, uint8_t* rgb_out);

/* The message and code of the last failed call on this thread ("" and SDXS_OK when there was none). */
const char* sdxs_last_error(void);
int sdxs_last_error_code(void);

/* Frees the context (NULL is fine). */
void sdxs_close(sdxs_ctx* ctx);

/* Sizes ExecuTorch's threadpool (XNNPACK runs on it; default one per core) for every context of the
 * process; *threads gets the size in effect. n <= 0 only reads it. */
int sdxs_threads(int n, int* threads);

/* ---- below: the steps one by one, for runtimes that check each component ---------------------- */

/* The image size the bundle makes. */
int sdxs_image_size(const sdxs_ctx* ctx, int* width, int* height);

/* The number of token ids the text encoder takes (77 for CLIP). */
int sdxs_max_length(const sdxs_ctx* ctx, int* max_length);

/* Token ids (max_length of them, int64) of a prompt; *length gets the untruncated count (start and
 * end included): more than max_length means the prompt was truncated. */
int sdxs_tokenize(sdxs_ctx* ctx, const char* prompt, int64_t* ids_out, int* length);

/* `numel` floats of the default noise for `seed`. */
int sdxs_noise(uint64_t seed, int64_t numel, float* out);

/* Every array of one generation. Inputs: `noise` when use_noise is set (else the seed's noise is
 * written there, if not NULL). Outputs, each skipped when NULL, sized by the manifest: token_ids
 * (max_length, int64), context (text-encoder output), model_output (U-Net output), latent (x0 fed to
 * the decoder), image (3 x H x W floats in [-1, 1]), rgb (H x W x 3 bytes). */
typedef struct sdxs_arrays {
  int64_t* token_ids;
  float* noise;
  float* context;
  float* model_output;
  float* latent;
  float* image;
  uint8_t* rgb;
  double ms[5]; /* out: wall-clock ms of tokenize + noise, text encoder, U-Net, rule + decoder, total */
} sdxs_arrays;
int sdxs_generate_arrays(sdxs_ctx* ctx, const char* prompt, uint64_t seed, int use_noise, sdxs_arrays* arrays);

/* Runs one component ("text_encoder", "unet", "decoder") on buffers laid out as the manifest declares
 * its inputs and outputs (positional order, C-contiguous). */
int sdxs_run_component(sdxs_ctx* ctx, const char* component, const void* const* inputs, void* const* outputs);

/* The tokenizer alone, over a tokenizer folder (vocab.json, merges.txt, special_tokens_map.json). */
typedef struct sdxs_tokenizer sdxs_tokenizer;
sdxs_tokenizer* sdxs_tokenizer_open(const char* folder, int max_length);
int sdxs_tokenizer_ids(sdxs_tokenizer* tok, const char* prompt, int64_t* ids_out, int* length);
void sdxs_tokenizer_close(sdxs_tokenizer* tok);

#ifdef __cplusplus
}
#endif

#endif /* SDXS_H */
