"""``tiecheck diff`` and ``tiecheck.diff()``: the tie structure of two targets compared.

The package is named after its job, not its command: ``tiecheck.diff`` is the public function, and
a subpackage of that name would replace it as an attribute of ``tiecheck`` once imported.
"""

from tiecheck.compare.tie_diff import TieDiff, diff, render_diff

__all__ = ["TieDiff", "diff", "render_diff"]
