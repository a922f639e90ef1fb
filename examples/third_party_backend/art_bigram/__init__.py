"""art-bigram: an example third-party backend for art (a bigram letter policy trained by policy gradient).

``from art_bigram import BigramBackend``; installed, it is also found as ``art_core.load_backend("bigram")``.
"""

from art_bigram.backend import BigramBackend

__version__ = "0.1.0"

__all__ = ["BigramBackend", "__version__"]
