"""Deprecated: backend picking moved to `ramba.ops.backends`; this alias goes in the next release."""

import warnings

from ramba.ops.backends import FAST, pick, unusable  # noqa: F401

warnings.warn("ramba.backends moved to ramba.ops.backends; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
