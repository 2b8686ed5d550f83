"""pytest setup shared by every test file (Bazel runs the files without it)."""

import os

# Sharding tests need 8 devices; on CPU, XLA fakes them. This must happen before
# jax is first imported. Test files that need the devices set it too, for Bazel.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
