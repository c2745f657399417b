"""Preloaded by the fork server of tests/test_faults.py: the training code, imported and warmed once."""

import fault_runs

fault_runs.warm()
