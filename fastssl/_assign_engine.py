"""Deprecated alias of :mod:`fastssl.assign.dispatch` (moved there with the assignment
package; removed in the next release). The alias is the very module object, so state
and monkeypatches are shared."""
import sys

from fastssl.assign import dispatch as _moved

sys.modules[__name__] = _moved
