"""selfplay: self-play preference optimization (SPPO, SAPO, SRPO) — the pure library.

Importing this package never imports Ray; the distributed runtime lives in `actors/`.
"""

__version__ = "0.1.0"
