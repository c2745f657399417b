/* C tests of libsdxs's bad-input paths (run by tests/test_capi.py, once under AddressSanitizer):
 *
 *   test_capi GOOD_BUNDLE BAD_BUNDLE...
 *
 * GOOD_BUNDLE must open; every BAD_BUNDLE must fail with an error code and a message. On the good one:
 * NULL arguments, a prompt that is not UTF-8, a size the bundle lacks, an unknown component, and one
 * real generation. Prints one line per check ("ok ..." or "FAIL ...") and exits 1 on any failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdxs.h"

static int failures = 0;

static void check(int cond, const char* what) {
  printf("%s %s%s%s\n", cond ? "ok" : "FAIL", what, cond ? "" : ": ", cond ? "" : sdxs_last_error());
  if (!cond) ++failures;
}

static void expect_error(int rc, int code, const char* what) {
  const char* msg = sdxs_last_error();
  const int ok = rc == code && sdxs_last_error_code() == code && msg && msg[0] && !strchr(msg, '\n');
  printf("%s %s -> %d: %s\n", ok ? "ok" : "FAIL", what, rc, msg ? msg : "(null)");
  if (!ok) ++failures;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: test_capi GOOD_BUNDLE [BAD_BUNDLE...]\n");
    return 2;
  }
  for (int i = 2; i < argc; ++i) {
    sdxs_ctx* bad = sdxs_open(argv[i]);
    const int code = sdxs_last_error_code();
    const int ok = bad == NULL && code != SDXS_OK && sdxs_last_error()[0] != '\0';
    printf("%s open %s -> code %d: %s\n", ok ? "ok" : "FAIL", argv[i], code, sdxs_last_error());
    if (!ok) ++failures;
    sdxs_close(bad);
  }
  expect_error(sdxs_open(NULL) == NULL ? sdxs_last_error_code() : SDXS_OK, SDXS_E_ARGUMENT, "open NULL");

  sdxs_ctx* ctx = sdxs_open(argv[1]);
  check(ctx != NULL, "open the good bundle");
  if (!ctx) return 1;
  int w = 0, h = 0, n = 0;
  check(sdxs_image_size(ctx, &w, &h) == SDXS_OK && w > 0 && h > 0, "image size");
  check(sdxs_max_length(ctx, &n) == SDXS_OK && n > 2, "max length");
  uint8_t* rgb = calloc((size_t)w * h * 3, 1);
  int64_t* ids = calloc((size_t)n, sizeof(int64_t));

  expect_error(sdxs_generate(ctx, "\xff\xfe bad", 0, w, h, rgb), SDXS_E_PROMPT, "prompt with invalid UTF-8");
  expect_error(sdxs_generate(ctx, "a \xed\xa0\x80 surrogate", 0, w, h, rgb), SDXS_E_PROMPT, "prompt with an encoded surrogate");
  expect_error(sdxs_generate(ctx, "overlong \xc0\xaf", 0, w, h, rgb), SDXS_E_PROMPT, "prompt with an overlong form");
  expect_error(sdxs_generate(ctx, "truncated \xe2\x82", 0, w, h, rgb), SDXS_E_PROMPT, "prompt cut inside a character");
  expect_error(sdxs_generate(ctx, "a prompt", 0, w * 2, h, rgb), SDXS_E_SIZE, "a size the bundle lacks");
  expect_error(sdxs_generate(ctx, NULL, 0, w, h, rgb), SDXS_E_ARGUMENT, "NULL prompt");
  expect_error(sdxs_generate(NULL, "x", 0, w, h, rgb), SDXS_E_ARGUMENT, "NULL context");
  expect_error(sdxs_generate(ctx, "x", 0, w, h, NULL), SDXS_E_ARGUMENT, "NULL output");
  const void* in[1] = {ids};
  void* out[1] = {rgb};
  expect_error(sdxs_run_component(ctx, "controlnet", in, out), SDXS_E_ARGUMENT, "unknown component");
  expect_error(sdxs_noise(0, 16, NULL), SDXS_E_ARGUMENT, "noise into NULL");

  char* long_prompt = malloc(20001);
  for (int i = 0; i < 20000; ++i) long_prompt[i] = "ab "[i % 3];
  long_prompt[20000] = '\0';
  int length = 0;
  check(sdxs_tokenize(ctx, long_prompt, ids, &length) == SDXS_OK && length > n, "an over-long prompt is truncated");
  check(sdxs_generate(ctx, long_prompt, 7, w, h, rgb) == SDXS_OK, "generate from an over-long prompt");
  check(sdxs_generate(ctx, "a small red circle at the top on a white background", 0, w, h, rgb) == SDXS_OK, "generate");
  check(sdxs_last_error_code() == SDXS_OK && sdxs_last_error()[0] == '\0', "a success clears the last error");
  free(long_prompt);
  free(ids);
  free(rgb);
  sdxs_close(ctx);
  sdxs_close(NULL);
  printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
