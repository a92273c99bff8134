"""Gradient aggregators; importing this package registers them."""
from amtl.balancers.aggregators import _aligned, _cagrad, _dual_cone, _fairgrad, _imtl_g, _mgda, _nash, _pcgrad  # noqa: F401
