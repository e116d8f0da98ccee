"""kstep_adam: communication-efficient adaptive optimizers for data-parallel JAX.

The public API is re-exported here, one name per line.
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
]
