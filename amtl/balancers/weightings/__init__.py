"""Loss weightings; importing this package registers them."""
from amtl.balancers.weightings import (_amtl, _dtp, _dwa, _ew, _famo, _gls, _gradnorm,  # noqa: F401
                                       _iltp, _imtl_l, _rlw, _stch, _uw)
