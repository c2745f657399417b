# Make fragment for the lead's Makefile: `include runtimes/native/arm64-runner.mk`, or paste it.
# `make arm64-runner` builds build/arm64/sdxs_runner, the aarch64 ExecuTorch runner the
# arm64-emulated runtime runs under qemu (installs the Debian cross compiler and qemu when missing,
# downloads the executorch aarch64 wheel once). Idempotent: a second run only re-checks.
.PHONY: arm64-runner
arm64-runner:
	runtimes/native/build_arm64.sh
