"""Deprecated alias of :mod:`fastssl.assign.triton_engine` (moved there with the assignment
package; removed in the next release). The alias is the very module object, so state
and monkeypatches are shared."""
import sys

from fastssl.assign import triton_engine as _moved

sys.modules[__name__] = _moved
