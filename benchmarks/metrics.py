"""Moved to :mod:`bundlerec_export.evaluation`; re-exported here for old imports."""

from bundlerec_export.evaluation import *  # noqa: F403
from bundlerec_export.evaluation import __all__  # noqa: F401
