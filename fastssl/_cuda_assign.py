"""Deprecated alias of :mod:`fastssl.assign.cuda_engine` (moved there with the assignment
package; removed in the next release). The alias is the very module object, so state
and monkeypatches are shared."""
import sys
import warnings

from fastssl.assign import cuda_engine as _moved

warnings.warn(f"{__name__} is deprecated and will be removed in the next release; "
              f"import fastssl.assign.cuda_engine", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
