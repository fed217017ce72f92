"""Site kinds of the approximate rewrites, as strategies looked up by name in :data:`KINDS`
(see :mod:`kernelize.passes.site_kinds.base` for what a kind provides). One module per kind;
importing this package registers them, attention first: its sites number the layers the
others are placed in.
"""

from kernelize.passes.site_kinds.base import KINDS, ApproxSite, Scan, SiteKind, get  # noqa: F401
from kernelize.passes.site_kinds import attention, projection  # noqa: F401,E402  (registers them, in this order)
