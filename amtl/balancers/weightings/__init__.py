"""Loss weightings; importing this package registers them."""
from amtl.balancers.weightings import _ew  # noqa: F401
