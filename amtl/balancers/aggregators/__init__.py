"""Gradient aggregators; importing this package registers them."""
from amtl.balancers.aggregators import (_aligned, _cagrad, _config, _cr_mogm, _double_sampling,  # noqa: F401
                                         _dual_cone, _excess_mtl, _fairgrad, _graddrop, _gradvac, _imtl_g, _mgda,
                                         _nash, _pcgrad, _tracked)
