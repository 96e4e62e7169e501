"""Deprecated alias of :mod:`fastssl.assign.common` (moved there with the assignment
package; removed in the next release). The alias is the very module object, so state
and monkeypatches are shared."""
import sys
import warnings

from fastssl.assign import common as _moved

warnings.warn(f"{__name__} is deprecated and will be removed in the next release; "
              f"import fastssl.assign.common", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
