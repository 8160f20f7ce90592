"""gaussnewton: exact and stochastic Gauss-Newton training for JAX models."""

__version__ = "0.1.0"
__all__: list[str] = []
