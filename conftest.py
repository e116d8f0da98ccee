"""Test configuration: 8 simulated CPU devices for every test and doctest in the suite.

The flag must be set before the JAX backend starts, so it lives here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
